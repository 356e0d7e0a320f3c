# Stand-in for OE-core's pkgconfig.bbclass.
DEPENDS:prepend = "pkgconfig-native "
