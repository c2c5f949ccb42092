//! Interop with real nameko 2.14.1 peers: microfw (runtime-tokio over RabbitMQ, Nameko
//! dialect) and the scripts in `tests/python/` (`nameko_echo.py`, `nameko_client.py`) call
//! each other's RPC methods and receive each other's events, with Nameko context data and
//! call id stacks crossing in both directions.
//!
//! Needs RabbitMQ at 127.0.0.1:5672 with `rabbitmqctl` on PATH, and `python3` (without it
//! every test prints `SKIPPED: ...` and passes). Each test has its own vhost.

mod common;

use std::time::Duration;

use common::{CALL, READY, Rt, config, json_after, json_before, run_all, wait_json};
use microfw_core::worker_context::WorkerContext;
use microfw_runtime_tokio::extract::{Context, Params, Payload, State};
use microfw_runtime_tokio::{
    CallError, EventListener, HandlerError, Producer, Reply, Route, RpcError, RpcListener, RpcProxy, Runner,
    RunnerContext, WorkerMode,
};
use microfw_tests::{PythonPeers, PythonProcess, TestVhost, Venv, peer_or_skip};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

// ---- microfw handlers ---------------------------------------------------------------------

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    #[serde(default)]
    b: i64,
}

async fn add(Params(AddArgs { a, b }): Params<AddArgs>) -> Reply<i64> {
    Reply(a + b)
}

#[derive(Deserialize)]
struct GreetArgs {
    name: String,
    greeting: Option<String>,
}

async fn greet(Params(GreetArgs { name, greeting }): Params<GreetArgs>) -> Reply<String> {
    Reply(format!("{}, {name}!", greeting.as_deref().unwrap_or("Hello")))
}

#[derive(Deserialize)]
struct FailArgs {
    message: String,
}

async fn fail(Params(FailArgs { message }): Params<FailArgs>) -> Result<(), HandlerError> {
    Err(HandlerError::fatal("ValueError", message).in_module("builtins"))
}

/// Calls `nameko_echo.context` from inside a worker and returns both sides' context.
async fn relay_context(rpc: RpcProxy, Context(ctx): Context) -> Result<Reply<Value>, HandlerError> {
    let nameko = rpc
        .call("nameko_echo", "context", (), ())
        .await
        .map_err(|e| HandlerError::fatal("RpcError", e.to_string()))?;
    Ok(Reply(json!({"microfw": context_json(&ctx), "nameko": nameko})))
}

#[derive(Deserialize)]
struct AnnounceArgs {
    payload: Value,
}

/// Dispatches `ping` from inside a worker (so the event carries the worker's context).
async fn announce(
    producer: Producer,
    Params(AnnounceArgs { payload }): Params<AnnounceArgs>,
) -> Result<Reply<bool>, HandlerError> {
    producer
        .dispatch("ping", &payload)
        .await
        .map_err(|e| HandlerError::fatal("DispatchError", e.to_string()))?;
    Ok(Reply(true))
}

/// What an event handler saw: its route, the payload and its worker context.
#[derive(Debug)]
struct Seen {
    route: String,
    payload: Value,
    context: Value,
}

async fn record(
    State(tx): State<mpsc::UnboundedSender<Seen>>,
    Context(ctx): Context,
    Payload(v): Payload<Value>,
) {
    let _ = tx.send(Seen { route: ctx.method().to_owned(), payload: v, context: context_json(&ctx) });
}

/// `{"data": {key: value...}, "call_id_stack": [...]}` of a microfw worker.
fn context_json(ctx: &WorkerContext) -> Value {
    let data: Map<String, Value> = ctx.data().map(|(k, v)| (k.to_owned(), v.to_json())).collect();
    json!({"data": data, "call_id_stack": ctx.call_id_stack()})
}

// ---- helpers ------------------------------------------------------------------------------

/// Starts `nameko_echo.py` with extra environment and waits until it consumes its RPC queue.
fn nameko_echo(venv: &Venv, vhost: &TestVhost, env: &[(&str, &str)]) -> PythonProcess {
    let uri = vhost.amqp_uri();
    let mut all = vec![("AMQP_URI", uri.as_str())];
    all.extend_from_slice(env);
    let service = PythonProcess::spawn(venv, "nameko_echo.py", &[], &all).unwrap();
    service.wait_for_line("READY", READY).unwrap();
    vhost.wait_for_queue("rpc-nameko_echo", 1, READY).unwrap();
    service
}

/// Spawns `nameko_client.py` with `args` (not waiting for it).
fn nameko_client(venv: &Venv, vhost: &TestVhost, args: &[&str], env: &[(&str, &str)]) -> PythonProcess {
    let uri = vhost.amqp_uri();
    let mut all = vec![("AMQP_URI", uri.as_str()), ("RPC_TIMEOUT", "20")];
    all.extend_from_slice(env);
    PythonProcess::spawn(venv, "nameko_client.py", args, &all).unwrap()
}

/// The exception class a `nameko_client.py call` raised (its `RAISED` line).
fn raised(client: &PythonProcess) -> String {
    let line = client.wait_for_line("RAISED ", Duration::ZERO).unwrap_or_else(|e| panic!("{e}"));
    line["RAISED ".len()..].to_owned()
}

fn remote_error(result: Result<Value, RpcError>) -> microfw_runtime_tokio::RemoteError {
    match result {
        Err(RpcError::Call(CallError::Remote(e))) => e,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

fn call_ids(context: &Value) -> Vec<String> {
    let stack =
        context["call_id_stack"].as_array().unwrap_or_else(|| panic!("no call_id_stack in {context}"));
    stack.iter().map(|id| id.as_str().unwrap_or_else(|| panic!("{id} is not a string")).to_owned()).collect()
}

/// Asserts `ids` are call ids `<prefix><uuid4>` for `prefixes`, in order.
fn assert_call_ids(ids: &[String], prefixes: &[&str]) {
    assert_eq!(ids.len(), prefixes.len(), "{ids:?} vs {prefixes:?}");
    for (id, prefix) in ids.iter().zip(prefixes) {
        let uuid = id.strip_prefix(prefix).unwrap_or_else(|| panic!("{id} does not start with {prefix}"));
        assert_eq!(uuid.len(), 36, "{id}: not a uuid after {prefix}");
    }
}

// ---- tests --------------------------------------------------------------------------------

/// Item 1: nameko's `ClusterRpcProxy` calls microfw methods positionally and by keyword, and
/// gets microfw's errors as the exception types a nameko caller expects.
#[test]
fn nameko_cluster_rpc_proxy_calls_microfw_methods_with_args_kwargs_and_typed_errors() {
    let venv = peer_or_skip!(PythonPeers::nameko());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    // `thread` worker mode: the handlers run on the context's pool threads.
    let mut cfg = config(&vhost, "mfw_calc");
    cfg.worker_mode = WorkerMode::Thread;
    let calc = rt.start(
        Runner::new(cfg).context(
            RunnerContext::new(4)
                .route(Route::new(RpcListener::new(), "add", add))
                .route(Route::new(RpcListener::new(), "greet", greet))
                .route(Route::new(RpcListener::new(), "fail", fail)),
        ),
    );
    let queue = vhost.wait_for_queue("rpc-mfw_calc", 1, READY).unwrap();
    assert_eq!(queue.messages, 0);

    let call = |args: &[&str]| nameko_client(&venv, &vhost, &[&["call", "mfw_calc"], args].concat(), &[]);
    let clients = run_all(vec![
        call(&["add", "[40]", r#"{"b": 2}"#]),
        call(&["add", "[]", r#"{"a": 1, "b": 2}"#]),
        call(&["greet", r#"["Ada"]"#, r#"{"greeting": "Bonjour"}"#]),
        call(&["greet", r#"["h\u00e9"]"#]),
        call(&["fail", r#"["no good"]"#]),
        call(&["nope", "[]"]),
        call(&["add", "[1, 2, 3]"]),
    ]);
    assert_eq!(json_after(&clients[0], "RESULT "), json!(42));
    assert_eq!(json_after(&clients[1], "RESULT "), json!(3));
    assert_eq!(json_after(&clients[2], "RESULT "), json!("Bonjour, Ada!"));
    assert_eq!(json_after(&clients[3], "RESULT "), json!("Hello, hé!"));
    // An error type nameko does not know arrives as RemoteError(exc_type, value).
    assert_eq!(json_after(&clients[4], "ERROR ValueError "), json!("no good"));
    assert_eq!(raised(&clients[4]), "nameko.exceptions.RemoteError");
    // Nameko's own exceptions are re-raised as their classes (found by exc_path).
    assert_eq!(json_after(&clients[5], "ERROR MethodNotFound "), json!("nope"));
    assert_eq!(raised(&clients[5]), "nameko.exceptions.MethodNotFound");
    let signature = json_after(&clients[6], "ERROR IncorrectSignature ");
    assert!(signature.as_str().is_some_and(|s| s.contains("positional")), "{signature}");
    assert_eq!(raised(&clients[6]), "nameko.exceptions.IncorrectSignature");

    rt.stop(calc);
}

/// Item 2: microfw's `RpcProxy` calls `nameko_echo.echo` (positional and keyword) and gets
/// nameko's errors as typed remote errors.
#[test]
fn microfw_rpc_proxy_calls_nameko_methods_and_gets_typed_remote_errors() {
    let venv = peer_or_skip!(PythonPeers::nameko());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let _nameko = nameko_echo(&venv, &vhost, &[]);
    let caller = rt.start(Runner::new(config(&vhost, "mfw_caller")));
    let rpc = caller.rpc();

    let value = json!({"n": 1, "s": "hé", "list": [true, null, 2.5], "big": 9_007_199_254_740_993_u64});
    assert_eq!(rt.wait("echo", rpc.call("nameko_echo", "echo", (value.clone(),), ())), Ok(value.clone()));
    assert_eq!(
        rt.wait("echo by keyword", rpc.call("nameko_echo", "echo", (), json!({"value": "kw"}))),
        Ok(json!("kw"))
    );
    let in_flight: Vec<_> = (0..8).map(|i| rpc.call("nameko_echo", "echo", (i,), ())).collect();
    for (i, call) in in_flight.into_iter().enumerate() {
        assert_eq!(rt.wait("echo in flight", call), Ok(json!(i)));
    }

    let context = rt.wait("context", rpc.call("nameko_echo", "context", (), ())).unwrap();
    assert_eq!(context.as_object().map(|o| o.len()), Some(1), "only the call id stack: {context}");
    assert_call_ids(&call_ids(&context), &["mfw_caller.standalone_rpc_call.", "nameko_echo.context."]);

    let e = remote_error(rt.wait("fail", rpc.call("nameko_echo", "fail", ("boom",), ())));
    assert_eq!(
        (e.exc_type.as_str(), e.module.as_str(), e.message.as_str()),
        ("ValueError", "builtins", "boom")
    );
    assert_eq!(e.args, ["boom"]);

    let e = remote_error(rt.wait("unknown method", rpc.call("nameko_echo", "nope", (), ())));
    assert_eq!(
        (e.exc_type.as_str(), e.path().as_str()),
        ("MethodNotFound", "nameko.exceptions.MethodNotFound")
    );
    let e = remote_error(rt.wait("bad signature", rpc.call("nameko_echo", "echo", (1, 2), ())));
    assert_eq!(e.path(), "nameko.exceptions.IncorrectSignature");

    rt.stop(caller);
}

/// Items 1 and 2 together: a nameko client's context data and call id stack go through a
/// microfw worker into the nameko service it calls (nameko -> microfw -> nameko).
#[test]
fn nameko_context_data_and_call_id_stack_cross_a_microfw_worker() {
    let venv = peer_or_skip!(PythonPeers::nameko());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let _nameko = nameko_echo(&venv, &vhost, &[]);
    let calc = rt.start(Runner::new(config(&vhost, "mfw_calc")).context(
        RunnerContext::new(2).route(Route::new(RpcListener::new(), "relay_context", relay_context)),
    ));
    // Header values keep their AMQP types: integers, floats, booleans, arrays, tables.
    let context = r#"{"language": "fr", "user_id": 7, "big": 1099511627776, "ratio": 0.5, "admin": true,
        "tags": ["a", 2], "extra": {"k": [1, {"deep": "h\u00e9"}]}}"#;
    let data = json!({"language": "fr", "user_id": 7, "big": 1_099_511_627_776_i64, "ratio": 0.5, "admin": true,
        "tags": ["a", 2], "extra": {"k": [1, {"deep": "hé"}]}});
    let clients = run_all(vec![nameko_client(
        &venv,
        &vhost,
        &["call", "mfw_calc", "relay_context", "[]"],
        &[("NAMEKO_CONTEXT_DATA", context)],
    )]);
    let result = json_after(&clients[0], "RESULT ");

    let (microfw, nameko) = (&result["microfw"], &result["nameko"]);
    assert_eq!(microfw["data"], data, "{result}");
    let microfw_ids = call_ids(microfw);
    assert_call_ids(&microfw_ids, &["standalone_rpc_proxy.call.", "mfw_calc.relay_context."]);
    let mut nameko_data = nameko.clone();
    nameko_data.as_object_mut().and_then(|o| o.remove("call_id_stack"));
    assert_eq!(nameko_data, data, "{result}");
    let nameko_ids = call_ids(nameko);
    assert_eq!(nameko_ids[..2], microfw_ids[..], "{result}");
    assert_call_ids(&nameko_ids[2..], &["nameko_echo.context."]);

    rt.stop(calc);
}

/// Item 3, nameko -> microfw: a standalone `event_dispatcher` and a nameko service's
/// `EventDispatcher` reach microfw `EventListener`s; the service's event carries its call id
/// stack, which the microfw worker extends.
#[test]
fn nameko_events_reach_microfw_event_listeners_with_their_context() {
    let venv = peer_or_skip!(PythonPeers::nameko());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = rt.start(
        Runner::with_state(config(&vhost, "mfw_sink"), tx).context(
            RunnerContext::new(2)
                .route(Route::new(EventListener::new("pinger", "ping"), "on_ping", record))
                .route(Route::new(EventListener::new("nameko_echo", "pong"), "on_pong", record)),
        ),
    );
    // The queues are named as a nameko handler of the same service and method would name them.
    vhost.wait_for_queue("evt-pinger-ping--mfw_sink.on_ping", 1, READY).unwrap();
    vhost.wait_for_queue("evt-nameko_echo-pong--mfw_sink.on_pong", 1, READY).unwrap();

    // The standalone dispatcher needs the exchange to exist: microfw declared it.
    let payload = r#"{"k": [1, 2], "s": "h\u00e9"}"#;
    let dispatched =
        run_all(vec![nameko_client(&venv, &vhost, &["dispatch", "pinger", "ping", payload], &[])]);
    dispatched[0].wait_for_line("DISPATCHED", Duration::ZERO).unwrap();
    let seen = rt.recv(&mut rx);
    assert_eq!((seen.route.as_str(), &seen.payload), ("on_ping", &json!({"k": [1, 2], "s": "hé"})));
    // The standalone dispatcher sends no context: the stack holds the worker's own id only.
    assert_call_ids(&call_ids(&seen.context), &["mfw_sink.on_ping."]);

    let nameko = nameko_echo(&venv, &vhost, &[]);
    let caller = rt.start(Runner::new(config(&vhost, "mfw_caller")));
    let emitted = rt.wait("emit", caller.rpc().call("nameko_echo", "emit", ("pong", json!([1, "two"])), ()));
    assert_eq!(emitted, Ok(json!(true)));
    let seen = rt.recv(&mut rx);
    assert_eq!((seen.route.as_str(), &seen.payload), ("on_pong", &json!([1, "two"])));
    // A call from outside any worker carries a call id of its own, as nameko's standalone
    // proxy does.
    assert_call_ids(
        &call_ids(&seen.context),
        &["mfw_caller.standalone_rpc_call.", "nameko_echo.emit.", "mfw_sink.on_pong."],
    );
    assert!(rx.try_recv().is_err(), "one event each");

    rt.stop(caller);
    rt.stop(sink);
    drop(nameko);
}

/// Item 3, microfw -> nameko: microfw's `Producer` (from the running service, and from inside
/// a worker) dispatches events a nameko `@event_handler` receives, with the worker's context.
#[test]
fn microfw_events_reach_a_nameko_event_handler_with_the_workers_context() {
    let venv = peer_or_skip!(PythonPeers::nameko());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let nameko = nameko_echo(&venv, &vhost, &[("EVENT_SOURCE", "mfw_src")]);
    vhost.wait_for_queue("evt-mfw_src-ping--nameko_echo.on_ping", 1, READY).unwrap();
    let src =
        rt.start(Runner::new(config(&vhost, "mfw_src")).context(RunnerContext::new(2).route(Route::new(
            RpcListener::new(),
            "announce",
            announce,
        ))));

    rt.wait("dispatch", src.producer().dispatch("ping", &json!({"n": 1, "s": "hé"}))).unwrap();
    assert_eq!(wait_json(&nameko, "EVENT ping ", CALL), json!({"n": 1, "s": "hé"}));
    // From outside any worker, as from nameko's standalone dispatcher: no context at all.
    let first = nameko.wait_for_line("EVENT ping ", CALL).unwrap();
    let context = json_before(&nameko, &first, "CONTEXT ping ");
    assert_eq!(context.as_object().map(|o| o.len()), Some(1), "{context}");
    assert_call_ids(&call_ids(&context), &["nameko_echo.on_ping."]);

    let clients = run_all(vec![nameko_client(
        &venv,
        &vhost,
        &["call", "mfw_src", "announce", r#"[{"n": 2}]"#],
        &[("NAMEKO_CONTEXT_DATA", r#"{"language": "fr"}"#)],
    )]);
    assert_eq!(json_after(&clients[0], "RESULT "), json!(true));
    let line = r#"EVENT ping {"n": 2}"#;
    nameko.wait_for_line(line, CALL).unwrap();
    let context = json_before(&nameko, line, "CONTEXT ping ");
    assert_eq!(context["language"], json!("fr"), "{context}");
    assert_call_ids(
        &call_ids(&context),
        &["standalone_rpc_proxy.call.", "mfw_src.announce.", "nameko_echo.on_ping."],
    );

    rt.stop(src);
}

/// Item 5 with nameko: a nameko service run with `AUTO_DELETE_EVENT_EXCHANGES: true` (as
/// nameko <= 2.12 always did) declares events exchanges auto-delete; microfw, declaring them
/// not auto-delete by default, adopts them as they are, both to dispatch and to listen.
#[test]
fn microfw_adopts_auto_delete_events_exchanges_declared_by_nameko() {
    let venv = peer_or_skip!(PythonPeers::nameko());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let nameko = nameko_echo(
        &venv,
        &vhost,
        &[("EVENT_SOURCE", "mfw_src"), ("NAMEKO_EXTRA_CONFIG", r#"{"AUTO_DELETE_EVENT_EXCHANGES": true}"#)],
    );
    vhost.wait_for_queue("evt-mfw_src-ping--nameko_echo.on_ping", 1, READY).unwrap();
    for exchange in ["mfw_src.events", "nameko_echo.events"] {
        let info = vhost.exchange(exchange).unwrap();
        assert!(info.as_ref().is_some_and(|e| e.auto_delete && e.durable), "{exchange}: {info:?}");
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    let src = rt.start(Runner::with_state(config(&vhost, "mfw_src"), tx).context(
        RunnerContext::new(2).route(Route::new(EventListener::new("nameko_echo", "pong"), "on_pong", record)),
    ));
    rt.wait("dispatch", src.producer().dispatch("ping", &json!({"adopted": true}))).unwrap();
    assert_eq!(wait_json(&nameko, "EVENT ping ", CALL), json!({"adopted": true}));

    let emitted = rt.wait("emit", src.rpc().call("nameko_echo", "emit", ("pong", json!({"back": 1})), ()));
    assert_eq!(emitted, Ok(json!(true)));
    let seen = rt.recv(&mut rx);
    assert_eq!((seen.route.as_str(), &seen.payload), ("on_pong", &json!({"back": 1})));

    // Adopted as they are: still auto-delete.
    for exchange in ["mfw_src.events", "nameko_echo.events"] {
        let info = vhost.exchange(exchange).unwrap();
        assert!(info.as_ref().is_some_and(|e| e.auto_delete), "{exchange}: {info:?}");
    }
    rt.stop(src);
}
