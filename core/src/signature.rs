//! A handler's RPC signature as Python sees it: the parameter names of its `Params<T>`, split
//! into those a caller must pass and those it may leave out. Target listings
//! (micro_framework's `__list_targets__` / `__get_target__`) are built from it.

use serde::Deserialize;

use crate::params::parameter_names;
use crate::probe::required_fields;

/// The parameters of an RPC handler, in declaration order.
///
/// A caller may pass any of them by position or by keyword (see
/// [`params::bind`](crate::params::bind)); `required` are those without a default, `optional`
/// those it may leave out (`Option` fields, `#[serde(default)]`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Signature {
    /// Parameters a caller must pass (micro_framework's `args`).
    pub required: Vec<&'static str>,
    /// Parameters a caller may leave out (micro_framework's `kwargs`).
    pub optional: Vec<&'static str>,
}

impl Signature {
    /// The signature of a handler taking `Params<T>`; `None` when `T` is not a struct with
    /// named fields (a tuple, `()`, a map: there are no names to list).
    ///
    /// Which fields are required is found by probing `T`'s `Deserialize` impl with
    /// placeholder values; when a field rejects its placeholder (a validating deserializer),
    /// every field is listed as required rather than guessed.
    pub fn of<T: for<'de> Deserialize<'de>>() -> Option<Signature> {
        let all = parameter_names::<T>()?;
        Some(match required_fields::<T>(all) {
            Some(required) => Signature {
                optional: all.iter().copied().filter(|f| !required.contains(f)).collect(),
                required: all.iter().copied().filter(|f| required.contains(f)).collect(),
            },
            None => Signature { required: all.to_vec(), optional: Vec::new() },
        })
    }

    /// Every parameter name, in declaration order of each group (required first).
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.required.iter().chain(&self.optional).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Args {
        a: i64,
        b: Option<String>,
        #[serde(default)]
        c: u32,
        d: Vec<u8>,
    }

    #[test]
    fn splits_required_from_optional() {
        let sig = Signature::of::<Args>().unwrap();
        assert_eq!(sig.required, ["a", "d"]);
        assert_eq!(sig.optional, ["b", "c"]);
        assert_eq!(sig.names().collect::<Vec<_>>(), ["a", "d", "b", "c"]);
    }

    #[test]
    fn tuples_and_unit_have_no_names() {
        assert_eq!(Signature::of::<(i64, i64)>(), None);
        assert_eq!(Signature::of::<()>(), None);
    }
}

#[cfg(test)]
mod route_tests {
    use serde_json::Value;

    use super::*;
    use crate::extract::{Params, Payload, State};
    use crate::route::{EventListener, Route, RpcListener};

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct AddArgs {
        a: i64,
        b: Option<i64>,
    }

    #[test]
    fn routes_record_the_signature_of_their_params() {
        let expected = Some(Signature { required: vec!["a"], optional: vec!["b"] });
        let blocking = Route::<()>::blocking(RpcListener::new(), "add", |Params(_): Params<AddArgs>| ());
        assert_eq!(blocking.spec().signature, expected);
        let with_state = Route::<u8>::new(
            RpcListener::new(),
            "add",
            |State(_): State<u8>, Params(_): Params<AddArgs>| async {},
        );
        assert_eq!(with_state.spec().signature, expected);
        let positional =
            Route::<()>::blocking(RpcListener::new(), "pair", |Params(_): Params<(i64, i64)>| ());
        assert_eq!(positional.spec().signature, None);
        let event = Route::<()>::blocking(EventListener::new("a", "b"), "e", |Payload(_): Payload<Value>| ());
        assert_eq!(event.spec().signature, None);
    }
}
