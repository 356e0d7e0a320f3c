//! Calling other services on the system bus (Avahi for discovery, systemd-timedated for the
//! clock) with plain messages: one argument type and one reply reader for every call, so that
//! zbus's generic call and (de)serialization code is in iotd once, not once per call's types
//! (Avahi's calls took 208 KB of the binary with typed proxies, 49 KB so; its budget is 5 MB).

use zbus::Variant;
use zbus::message::Message;

/// A method call's arguments: none, or a structure of D-Bus values. Every call passes this one
/// type, so that zbus's generic call and serialization code is in iotd once rather than once
/// per argument list.
pub struct Args<'a>(Option<zbus::Structure<'a>>);

impl<'a> Args<'a> {
    pub const NONE: Self = Args(None);

    pub fn new(fields: impl Into<zbus::Structure<'a>>) -> Self {
        Args(Some(fields.into()))
    }
}

impl serde::Serialize for Args<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(fields) => fields.serialize(serializer),
            None => serializer.serialize_unit(),
        }
    }
}

impl zbus::DynamicType for Args<'_> {
    fn signature(&self) -> zbus::Signature {
        match &self.0 {
            Some(fields) => fields.signature().clone(),
            None => zbus::Signature::Unit,
        }
    }
}

/// A reply's or a signal's values, read by position; each value's D-Bus type is checked as it
/// is read. One dynamic reader for every message, rather than a typed deserializer per reply,
/// keeps zbus's generic decoding code in iotd once.
pub struct Values(zbus::message::Body);

impl Values {
    pub fn of(message: &Message) -> Self {
        Values(message.body())
    }

    /// The value at `index`, as a `T`.
    pub fn get<'a, T>(&'a self, index: usize) -> zbus::Result<T>
    where
        T: TryFrom<Variant<'a>, Error = zbus::Error>,
    {
        T::try_from(self.value(index)?)
    }

    /// Decodes the body again for each value: Avahi's messages carry a few small values, and
    /// iotd reads each once.
    pub fn value(&self, index: usize) -> zbus::Result<Variant<'_>> {
        // Even a single value comes as a structure of one.
        let mut values = self.0.deserialize::<zbus::Structure<'_>>()?.into_fields();
        if index >= values.len() {
            return Err(zbus::Error::IncorrectType);
        }
        Ok(values.swap_remove(index))
    }
}

/// Calls `method` of `interface` at `path` of `destination`; the reply's values.
pub async fn call(
    connection: &zbus::Connection,
    destination: &str,
    path: &str,
    interface: &str,
    method: &str,
    args: Args<'_>,
) -> zbus::Result<Values> {
    let reply = connection
        .call_method(Some(destination), path, Some(interface), method, &args)
        .await?;
    Ok(Values::of(&reply))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What iotd sends (here Avahi's AddService) is what a typed call would send, and replies read back by position
    /// with their types checked.
    #[test]
    fn arguments_and_values_are_d_bus_values() {
        let txt = vec![b"v=1".to_vec(), b"sn=GW-1".to_vec()];
        let typed = (-1i32, 0u32, "iotd GW-1", 8443u16, txt);
        let message = Message::method_call("/", "AddService")
            .build(&Args::new(typed.clone()))
            .unwrap();
        let expected = Message::method_call("/", "AddService")
            .build(&typed)
            .unwrap();
        assert_eq!(message.body().signature().to_string_no_parens(), "iusqaay");
        assert_eq!(message.body().signature(), expected.body().signature());
        assert_eq!(
            message.body().data().bytes(),
            expected.body().data().bytes()
        );
        let values = Values::of(&message);
        assert_eq!(values.get::<i32>(0).unwrap(), -1);
        assert_eq!(values.get::<String>(2).unwrap(), "iotd GW-1");
        assert!(values.get::<i32>(2).is_err(), "a string is not an i32");
        assert!(values.get::<u16>(5).is_err(), "there are five values");

        let single = Message::method_call("/", "GetState")
            .build(&Args::new((2i32,)))
            .unwrap();
        assert_eq!(single.body().signature().to_string_no_parens(), "i");
        assert_eq!(Values::of(&single).get::<i32>(0).unwrap(), 2);
        let none = Message::method_call("/", "Commit")
            .build(&Args::NONE)
            .unwrap();
        assert!(none.body().is_empty());
        assert!(Values::of(&none).get::<i32>(0).is_err());
    }
}
