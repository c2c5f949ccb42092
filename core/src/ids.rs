//! Newtyped identifiers: never a bare integer or string where an id is meant.

use std::fmt;

macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub(crate) $inner);

        impl $name {
            /// Builds the id from its raw number (for runtimes, transports and tests).
            pub const fn from_raw(raw: $inner) -> Self {
                Self(raw)
            }

            /// The raw number behind the id.
            pub const fn into_raw(self) -> $inner {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

numeric_id!(
    /// A route of the service: its index in declaration order, so the same service
    /// definition always gives the same ids (a re-executed worker process rebuilds the
    /// same table).
    RouteId(u32)
);
numeric_id!(
    /// A [`RunnerContext`](crate::route::RunnerContext): a group of routes sharing a worker
    /// budget. Its index in declaration order.
    ContextId(u32)
);
numeric_id!(
    /// One run of a handler (a worker). Every command a handler sends names its dispatch,
    /// so the Engine attaches that worker's context.
    DispatchId(u64)
);
numeric_id!(
    /// A transport connection, numbered by the runtime.
    LinkId(u32)
);
numeric_id!(
    /// A delivery tag as the link numbers them (AMQP's delivery tag, or the memory
    /// broker's). Unique per link.
    DeliveryTag(u64)
);
numeric_id!(
    /// A consumer the Engine asked a link to start ([`Action::Subscribe`](crate::Action)).
    SubscriptionId(u32)
);
numeric_id!(
    /// One publish the Engine asked for; its confirm comes back with the same id.
    PublishId(u64)
);
numeric_id!(
    /// One outgoing RPC call, as the runtime knows it.
    CallId(u64)
);

/// Where a delivery came from: the link and its tag. Acks and rejects name it.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub struct DeliveryRef {
    /// The link the delivery arrived on.
    pub link: LinkId,
    /// The link's tag for it.
    pub tag: DeliveryTag,
}

/// An RPC correlation id: a fresh uuid4 string per call. Opaque to the core beyond equality.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct CorrelationId(String);

impl CorrelationId {
    /// Wraps a correlation id read off the wire.
    pub fn new(id: impl Into<String>) -> Self {
        CorrelationId(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A hasher for the Engine's own sequential numeric ids (dispatches, publishes, calls): one
/// multiply instead of SipHash. Not for keys that come from outside the process (a peer could
/// choose colliding keys); those keep the std hasher.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: spreads sequential ids over the high bits hashbrown uses.
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by the Engine's own numeric ids.
pub(crate) type IdMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;
