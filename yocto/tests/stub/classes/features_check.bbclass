# Stand-in for OE-core's features_check.bbclass (REQUIRED_DISTRO_FEATURES only).
python () {
    required = (d.getVar('REQUIRED_DISTRO_FEATURES') or "").split()
    missing = [f for f in required if not bb.utils.contains('DISTRO_FEATURES', f, True, False, d)]
    if missing:
        raise bb.parse.SkipRecipe("missing required distro feature%s '%s' (not in DISTRO_FEATURES)"
                                  % ("s" if len(missing) > 1 else "", " ".join(missing)))
}
