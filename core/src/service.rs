//! A service definition: a name, contexts of routes, and shared state; split into what the
//! Engine needs ([`ServiceSpec`]) and what the runtime needs ([`HandlerTable`]).

use std::collections::HashSet;
use std::sync::Arc;

use crate::handler::BoxedHandler;
use crate::ids::{ContextId, RouteId};
use crate::route::{ContextSpec, Entrypoint, RouteSpec, RunnerContext};

/// A service: a name, its contexts, and the state its handlers share.
#[derive(Debug)]
pub struct Service<S = ()> {
    name: String,
    contexts: Vec<RunnerContext<S>>,
    state: S,
}

impl Service<()> {
    /// A service named `name` with no shared state.
    pub fn new(name: impl Into<String>) -> Self {
        Service::with_state(name, ())
    }
}

impl<S: Clone + Send + Sync + 'static> Service<S> {
    /// A service named `name` whose handlers can extract `State<T>` for every `T: FromRef<S>`.
    pub fn with_state(name: impl Into<String>, state: S) -> Self {
        Service { name: name.into(), contexts: Vec::new(), state }
    }

    /// Adds a context.
    pub fn context(mut self, context: RunnerContext<S>) -> Self {
        self.contexts.push(context);
        self
    }

    /// Validates the definition and splits it. Route ids are assigned in declaration order
    /// (each failure callback right after its route), so the same definition always gives
    /// the same ids.
    pub fn build(self) -> Result<(ServiceSpec, HandlerTable<S>), BuildError> {
        if self.name.is_empty() || self.name.contains('.') {
            return Err(BuildError::InvalidServiceName(self.name));
        }
        let mut routes = Vec::new();
        let mut contexts = Vec::new();
        let mut handlers = Vec::new();
        let mut rpc_names = HashSet::new();
        let mut event_names = HashSet::new();
        for (ci, ctx) in self.contexts.into_iter().enumerate() {
            let context = ContextId(index_u32(ci)?);
            contexts.push(ContextSpec {
                max_workers: ctx.max_workers,
                prefetch: ctx.prefetch.unwrap_or(ctx.max_workers).max(ctx.max_workers),
                shutdown: ctx.shutdown,
                metric_label: ctx.metric_label.unwrap_or_else(|| format!("context_{ci}")),
            });
            for route in ctx.routes {
                let mut spec = route.spec;
                validate(&spec, &mut rpc_names, &mut event_names)?;
                let callback = route.callback.map(|cb| {
                    let cb_spec = RouteSpec {
                        metric_label: format!("CallbackRoute__{}", cb.name),
                        name: cb.name,
                        entrypoint: Entrypoint::Callback,
                        translators: Vec::new(),
                        retry: Default::default(),
                        on_give_up: spec.on_give_up,
                        callback: None,
                        doc: None,
                        signature: None,
                    };
                    (cb_spec, cb.handler)
                });
                if callback.is_some() {
                    spec.callback = Some(RouteId(index_u32(routes.len() + 1)?));
                }
                routes.push((spec, context));
                handlers.push(route.handler);
                if let Some((cb_spec, cb_handler)) = callback {
                    routes.push((cb_spec, context));
                    handlers.push(cb_handler);
                }
            }
        }
        index_u32(routes.len())?;
        let spec = ServiceSpec { name: Arc::from(self.name), routes, contexts };
        Ok((spec, HandlerTable { handlers, state: self.state }))
    }
}

/// What the Engine needs of a service: names, routes, contexts. No handlers.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    /// The service name (`SERVICE_NAME`).
    pub name: Arc<str>,
    /// Routes by [`RouteId`], each with its context.
    pub routes: Vec<(RouteSpec, ContextId)>,
    /// Contexts by [`ContextId`].
    pub contexts: Vec<ContextSpec>,
}

impl ServiceSpec {
    /// True when some route is a WebSocket RPC method (the runtimes then open a WebSocket
    /// link for the service).
    pub fn serves_websocket(&self) -> bool {
        self.routes.iter().any(|(route, _)| matches!(route.entrypoint, Entrypoint::WsRpc(_)))
    }

    /// Checks that the parts fit together; [`Service::build`] output always does.
    pub fn check(&self) -> Result<(), BuildError> {
        let bad = |what: String| Err(BuildError::InconsistentSpec(what));
        for context in &self.contexts {
            if context.max_workers == 0 {
                return bad(format!("context {:?} has a budget of 0", context.metric_label));
            }
        }
        for (spec, context) in &self.routes {
            if context.0 as usize >= self.contexts.len() {
                return bad(format!(
                    "route {:?} names context {} of {}",
                    spec.name,
                    context.0,
                    self.contexts.len()
                ));
            }
            if let Some(callback) = spec.callback {
                let target = self.routes.get(callback.0 as usize).map(|(r, _)| &r.entrypoint);
                if !matches!(target, Some(Entrypoint::Callback)) {
                    return bad(format!(
                        "route {:?} names callback {} which is not a callback route",
                        spec.name, callback
                    ));
                }
            }
            if let Entrypoint::Timer(t) = &spec.entrypoint
                && t.interval.is_zero()
            {
                return Err(BuildError::ZeroInterval(spec.name.clone()));
            }
        }
        Ok(())
    }
}

/// What the runtime needs of a service: the handlers by [`RouteId`], and the shared state.
#[derive(Debug)]
pub struct HandlerTable<S> {
    handlers: Vec<BoxedHandler<S>>,
    state: S,
}

impl<S> HandlerTable<S> {
    /// The handler of `route`.
    pub fn handler(&self, route: RouteId) -> Option<&BoxedHandler<S>> {
        self.handlers.get(route.0 as usize)
    }

    /// The shared state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Every handler, by route id.
    pub fn handlers(&self) -> &[BoxedHandler<S>] {
        &self.handlers
    }
}

/// Why a service definition was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Service names are non-empty and contain no dot (it would break RPC routing keys).
    #[error("invalid service name {0:?}: it must be non-empty and contain no '.'")]
    InvalidServiceName(String),
    /// Route names are non-empty and contain no dot (`*` in `<svc>.*` matches one word).
    #[error("invalid route name {0:?}: it must be non-empty and contain no '.'")]
    InvalidRouteName(String),
    /// Two RPC methods with one name on one transport and dialect.
    #[error("RPC method {0:?} is defined twice")]
    DuplicateMethod(String),
    /// Two event routes with one name listening to the same event (they would share a queue).
    #[error("event route {0:?} listens to the same event twice")]
    DuplicateEventRoute(String),
    /// A timer needs a positive interval.
    #[error("timer route {0:?} has a zero interval")]
    ZeroInterval(String),
    /// A hand-made [`ServiceSpec`] whose parts do not fit together (a route naming a context
    /// or callback that does not exist, a zero budget). [`Service::build`] never makes one.
    #[error("inconsistent service spec: {0}")]
    InconsistentSpec(String),
    /// More routes or contexts than ids can number.
    #[error("too many routes or contexts")]
    TooMany,
}

fn validate(
    spec: &RouteSpec,
    rpc_names: &mut HashSet<(u8, String)>,
    event_names: &mut HashSet<(String, String, String)>,
) -> Result<(), BuildError> {
    if spec.name.is_empty() || spec.name.contains('.') {
        return Err(BuildError::InvalidRouteName(spec.name.clone()));
    }
    match &spec.entrypoint {
        Entrypoint::Rpc(l) => {
            let key = (if l.dialect == crate::route::Dialect::Nameko { 0 } else { 1 }, spec.name.clone());
            if !rpc_names.insert(key) {
                return Err(BuildError::DuplicateMethod(spec.name.clone()));
            }
        }
        Entrypoint::WsRpc(_) => {
            if !rpc_names.insert((2, spec.name.clone())) {
                return Err(BuildError::DuplicateMethod(spec.name.clone()));
            }
        }
        Entrypoint::Event(l) => {
            let key = (l.source_service.clone(), l.event_type.clone(), spec.name.clone());
            if !event_names.insert(key) {
                return Err(BuildError::DuplicateEventRoute(spec.name.clone()));
            }
        }
        Entrypoint::Timer(t) => {
            if t.interval.is_zero() {
                return Err(BuildError::ZeroInterval(spec.name.clone()));
            }
        }
        Entrypoint::Callback => {}
    }
    Ok(())
}

fn index_u32(i: usize) -> Result<u32, BuildError> {
    u32::try_from(i).map_err(|_| BuildError::TooMany)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::extract::Payload;
    use crate::route::{CallbackRoute, EventListener, Route, RpcListener, TimeEntrypoint};

    fn h(Payload(_): Payload<serde_json::Value>) {}

    fn ctx() -> RunnerContext<()> {
        RunnerContext::new(2)
    }

    #[test]
    fn route_ids_follow_declaration_order_with_callbacks_after_their_route() {
        let service = Service::new("svc")
            .context(
                ctx().route(
                    Route::blocking(EventListener::new("a", "e"), "first", h)
                        .callback(CallbackRoute::blocking("cb", h)),
                ),
            )
            .context(ctx().route(Route::blocking(RpcListener::new(), "second", h)));
        let (spec, handlers) = service.build().unwrap();
        let names: Vec<&str> = spec.routes.iter().map(|(r, _)| r.name.as_str()).collect();
        assert_eq!(names, ["first", "cb", "second"]);
        assert_eq!(spec.routes[0].0.callback, Some(RouteId(1)));
        assert_eq!(spec.routes[1].1, ContextId(0));
        assert_eq!(spec.routes[2].1, ContextId(1));
        assert_eq!(spec.routes[1].0.metric_label, "CallbackRoute__cb");
        assert_eq!(spec.routes[2].0.metric_label, "Route__second");
        assert_eq!(handlers.handlers().len(), 3);
        // Same definition, same table.
        let again = Service::new("svc")
            .context(
                ctx().route(
                    Route::blocking(EventListener::new("a", "e"), "first", h)
                        .callback(CallbackRoute::blocking("cb", h)),
                ),
            )
            .context(ctx().route(Route::blocking(RpcListener::new(), "second", h)));
        let (spec2, _) = again.build().unwrap();
        assert_eq!(format!("{:?}", spec.routes), format!("{:?}", spec2.routes));
    }

    #[test]
    fn prefetch_is_never_below_the_budget() {
        let (spec, _) = Service::new("svc")
            .context(RunnerContext::<()>::new(8).prefetch(2))
            .context(RunnerContext::<()>::new(2).prefetch(64))
            .build()
            .unwrap();
        assert_eq!(spec.contexts[0].prefetch, 8);
        assert_eq!(spec.contexts[1].prefetch, 64);
        assert_eq!(spec.contexts[0].metric_label, "context_0");
    }

    #[test]
    fn invalid_definitions_are_refused_with_a_reason() {
        let build = |s: Service<()>| s.build().map(|_| ()).unwrap_err();
        assert_eq!(build(Service::new("")), BuildError::InvalidServiceName(String::new()));
        assert_eq!(build(Service::new("a.b")), BuildError::InvalidServiceName("a.b".into()));
        let dotted = Service::new("svc").context(ctx().route(Route::blocking(RpcListener::new(), "a.b", h)));
        assert_eq!(build(dotted), BuildError::InvalidRouteName("a.b".into()));
        let twice = Service::new("svc")
            .context(ctx().route(Route::blocking(RpcListener::new(), "m", h)))
            .context(ctx().route(Route::blocking(RpcListener::new(), "m", h)));
        assert_eq!(build(twice), BuildError::DuplicateMethod("m".into()));
        let same_event = Service::new("svc").context(
            ctx().route(Route::blocking(EventListener::new("a", "e"), "x", h)).route(Route::blocking(
                EventListener::new("a", "e"),
                "x",
                h,
            )),
        );
        assert_eq!(build(same_event), BuildError::DuplicateEventRoute("x".into()));
        let zero = Service::new("svc").context(ctx().route(Route::blocking(
            TimeEntrypoint::new(Duration::ZERO),
            "t",
            h,
        )));
        assert_eq!(build(zero), BuildError::ZeroInterval("t".into()));
        // One method name may be served in both dialects (the migration case).
        let both =
            Service::new("svc").context(ctx().route(Route::blocking(RpcListener::new(), "m", h)).route(
                Route::blocking(RpcListener::new().dialect(crate::route::Dialect::MicroFramework), "m", h),
            ));
        assert!(both.build().is_ok());
    }
}
