//! Interop with real micro_framework 2.0.16 peers: microfw (runtime-tokio over RabbitMQ) serves
//! and calls RPC in micro_framework's `ufw-rpc` dialect (double-encoded replies, target
//! listings) and exchanges events with micro_framework services, adopting the events exchanges
//! micro_framework declares auto-delete. The peers are `tests/python/mf_service.py` and
//! `tests/python/mf_client.py`.
//!
//! Needs RabbitMQ at 127.0.0.1:5672 with `rabbitmqctl` on PATH, and `python3` (without it
//! every test prints `SKIPPED: ...` and passes). Each test has its own vhost.

mod common;

use common::{CALL, READY, Rt, config, json_after, run_all, wait_json};
use microfw_runtime_tokio::extract::{Context, Params, Payload, State};
use microfw_runtime_tokio::{
    CallError, Dialect, EventListener, HandlerError, Reply, Route, RpcError, RpcListener, Runner,
    RunnerContext, TargetDetail,
};
use microfw_tests::{PythonPeers, PythonProcess, TestVhost, Venv, free_tcp_port, peer_or_skip};
use serde::Deserialize;
use serde_json::{Value, json};
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
struct EchoArgs {
    value: Value,
}

async fn echo(Params(EchoArgs { value }): Params<EchoArgs>) -> Reply<Value> {
    Reply(value)
}

#[derive(Deserialize)]
struct FailArgs {
    message: String,
}

async fn fail(Params(FailArgs { message }): Params<FailArgs>) -> Result<(), HandlerError> {
    Err(HandlerError::fatal("ValueError", message))
}

/// What an event handler saw: its route and the payload.
type Seen = (String, Value);

async fn record(
    State(tx): State<mpsc::UnboundedSender<Seen>>,
    Context(ctx): Context,
    Payload(v): Payload<Value>,
) {
    let _ = tx.send((ctx.method().to_owned(), v));
}

// ---- helpers ------------------------------------------------------------------------------

/// Starts `mf_service.py` (service `mf_echo` unless `env` says otherwise) on a free WebSocket
/// port and waits until it serves AMQP RPC (its broadcast queue has a consumer).
fn mf_service(venv: &Venv, vhost: &TestVhost, env: &[(&str, &str)]) -> PythonProcess {
    let uri = vhost.amqp_uri();
    let port = free_tcp_port().unwrap().to_string();
    let mut all = vec![("AMQP_URI", uri.as_str()), ("WEBSOCKET_PORT", port.as_str())];
    all.extend_from_slice(env);
    let name = all.iter().rev().find(|(k, _)| *k == "SERVICE_NAME").map_or("mf_echo", |(_, v)| *v);
    let broadcast = format!("rpc-{name}-broadcast");
    let service = PythonProcess::spawn(venv, "mf_service.py", &[], &all).unwrap();
    service.wait_for_line("READY", READY).unwrap();
    vhost.wait_for_queue(&broadcast, 1, READY).unwrap();
    service
}

/// Spawns `mf_client.py amqp SERVICE TARGET ARGS [KWARGS]` (not waiting for it).
fn mf_client(venv: &Venv, vhost: &TestVhost, args: &[&str]) -> PythonProcess {
    let uri = vhost.amqp_uri();
    let args = [&["amqp"], args].concat();
    PythonProcess::spawn(venv, "mf_client.py", &args, &[("AMQP_URI", uri.as_str())]).unwrap()
}

fn remote_error(result: Result<Value, RpcError>) -> microfw_runtime_tokio::RemoteError {
    match result {
        Err(RpcError::Call(CallError::Remote(e))) => e,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

fn detail(target: &str, args: &[&str], kwargs: &[&str], doc: Option<&str>) -> TargetDetail {
    TargetDetail::new(target, args.iter().copied(), kwargs.iter().copied(), doc.map(str::to_owned))
}

fn exchange_flags(vhost: &TestVhost, name: &str) -> Option<(bool, bool)> {
    vhost.exchange(name).unwrap().map(|e| (e.durable, e.auto_delete))
}

// ---- tests --------------------------------------------------------------------------------

/// Item 4, micro_framework -> microfw: micro_framework's `RPCProxyProvider` builds its proxy
/// from microfw's `__list_targets__` answer, then calls microfw's ufw-rpc methods and reads
/// their double-encoded replies; a microfw error is re-raised as the builtin exception.
#[test]
fn micro_framework_client_lists_and_calls_microfw_ufw_rpc_methods() {
    let venv = peer_or_skip!(PythonPeers::micro_framework());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let mf = || RpcListener::new().dialect(Dialect::MicroFramework);
    let calc = rt.start(
        Runner::new(config(&vhost, "mfw_calc")).context(
            RunnerContext::new(4)
                .route(Route::new(mf(), "add", add).doc("Adds a and b."))
                .route(Route::new(mf(), "echo", echo))
                .route(Route::new(mf(), "fail", fail)),
        ),
    );
    // micro_framework's queue layout: one queue per target plus the broadcast queue.
    for queue in ["rpc-mfw_calc-add", "rpc-mfw_calc-echo", "rpc-mfw_calc-fail", "rpc-mfw_calc-broadcast"] {
        vhost.wait_for_queue(queue, 1, READY).unwrap();
    }

    let clients = run_all(vec![
        mf_client(&venv, &vhost, &["mfw_calc", "add", "[40]", r#"{"b": 2}"#]),
        mf_client(&venv, &vhost, &["mfw_calc", "echo", r#"[{"x": [1, "two", null], "s": "h\u00e9"}]"#]),
        mf_client(&venv, &vhost, &["mfw_calc", "fail", r#"["no good"]"#]),
    ]);
    let listing = json!([
        {"target": "add", "args": ["a"], "kwargs": ["b"], "docstring": "Adds a and b."},
        {"target": "echo", "args": ["value"], "kwargs": [], "docstring": null},
        {"target": "fail", "args": ["message"], "kwargs": [], "docstring": null},
    ]);
    for client in &clients {
        assert_eq!(json_after(client, "TARGETS "), listing, "{}", client.dump());
    }
    assert_eq!(json_after(&clients[0], "RESULT "), json!(42));
    assert_eq!(json_after(&clients[1], "RESULT "), json!({"x": [1, "two", null], "s": "hé"}));
    assert_eq!(json_after(&clients[2], "ERROR ValueError "), json!("no good"));

    rt.stop(calc);
}

/// Item 4, microfw -> micro_framework: microfw calls `mf_service`'s targets over ufw-rpc
/// (positional and keyword arguments, remote errors, an unknown target) and lists them.
#[test]
fn microfw_calls_micro_framework_rpc_and_lists_its_targets() {
    let venv = peer_or_skip!(PythonPeers::micro_framework());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let _peer = mf_service(&venv, &vhost, &[]);
    let caller = rt.start(Runner::new(config(&vhost, "mfw_caller")));
    let rpc = caller.rpc().dialect(Dialect::MicroFramework);

    assert_eq!(rt.wait("add", rpc.call("mf_echo", "add", (40,), json!({"b": 2}))), Ok(json!(42)));
    assert_eq!(rt.wait("add by keyword", rpc.call("mf_echo", "add", (), json!({"a": 1}))), Ok(json!(1)));
    let value = json!({"n": 1, "s": "hé", "list": [true, null, 2.5]});
    assert_eq!(rt.wait("echo", rpc.call("mf_echo", "echo", (value.clone(),), ())), Ok(value));
    let in_flight: Vec<_> = (0..6).map(|i| rpc.call("mf_echo", "add", (i, i), ())).collect();
    for (i, call) in in_flight.into_iter().enumerate() {
        assert_eq!(rt.wait("add in flight", call), Ok(json!(2 * i)));
    }

    let e = remote_error(rt.wait("fail", rpc.call("mf_echo", "fail", ("boom",), ())));
    assert_eq!((e.exc_type.as_str(), e.message.as_str()), ("ValueError", "boom"));
    let e = remote_error(rt.wait("bad arguments", rpc.call("mf_echo", "add", (), ())));
    assert_eq!(e.exc_type, "TypeError", "{e:?}");
    // The target queue does not exist: the mandatory request comes back unroutable.
    let unknown = rt.wait("unknown target", rpc.call("mf_echo", "nope", (), ()));
    assert!(matches!(unknown, Err(RpcError::Call(CallError::UnknownService(_)))), "{unknown:?}");

    let mut targets = rt.wait("targets", rpc.targets("mf_echo")).unwrap();
    targets.sort_by(|x, y| x.target.cmp(&y.target));
    // micro_framework lists every RPC target of its process, WebSocket ones included; an
    // injected dependency (emit's `producer`) is not a parameter.
    assert_eq!(
        targets,
        vec![
            detail("add", &["a"], &["b"], None),
            detail("echo", &["value"], &[], None),
            detail("emit", &["event_name", "payload"], &[], None),
            detail("fail", &["message"], &[], None),
            detail("ws_add", &["a"], &["b"], None),
            detail("ws_echo", &["value"], &[], None),
        ]
    );
    assert_eq!(rt.wait("target", rpc.target("mf_echo", "add")), Ok(detail("add", &["a"], &["b"], None)));
    let e = rt.wait("unknown target detail", rpc.target("mf_echo", "nope"));
    assert!(matches!(&e, Err(RpcError::Call(CallError::Remote(r))) if r.exc_type == "KeyError"), "{e:?}");

    rt.stop(caller);
}

/// Item 5, micro_framework -> microfw: micro_framework's `Producer` dispatches an event that
/// microfw listeners receive in both dialects. micro_framework declared the events exchange
/// auto-delete first; the Nameko-dialect listener (not auto-delete) adopts it as it is.
#[test]
fn micro_framework_events_reach_microfw_listeners_in_both_dialects() {
    let venv = peer_or_skip!(PythonPeers::micro_framework());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    // mf_echo listens to its own `ping`, so it declares `mf_echo.events` (auto-delete) at start.
    let peer = mf_service(&venv, &vhost, &[("EVENT_SOURCE", "mf_echo")]);
    vhost.wait_for_queue("mf_echo.ping__mf_echo.on_ping", 1, READY).unwrap();
    assert_eq!(exchange_flags(&vhost, "mf_echo.events"), Some((true, true)));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mf_listener = EventListener::new("mf_echo", "ping").dialect(Dialect::MicroFramework);
    let sink = rt.start(Runner::with_state(config(&vhost, "mfw_sink"), tx).context(
        RunnerContext::new(2).route(Route::new(mf_listener, "on_mf_ping", record)).route(Route::new(
            EventListener::new("mf_echo", "ping"),
            "on_ping",
            record,
        )),
    ));
    // micro_framework's queue naming for the one, Nameko's for the other.
    vhost.wait_for_queue("mf_echo.ping__mfw_sink.on_mf_ping", 1, READY).unwrap();
    vhost.wait_for_queue("evt-mf_echo-ping--mfw_sink.on_ping", 1, READY).unwrap();
    assert_eq!(exchange_flags(&vhost, "mf_echo.events"), Some((true, true)), "adopted as it is");

    let payload = json!({"k": [1, 2], "s": "hé"});
    let rpc = sink.rpc().dialect(Dialect::MicroFramework);
    assert_eq!(rt.wait("emit", rpc.call("mf_echo", "emit", ("ping", payload.clone()), ())), Ok(json!(true)));
    let mut seen = vec![rt.recv(&mut rx), rt.recv(&mut rx)];
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        seen,
        vec![("on_mf_ping".to_owned(), payload.clone()), ("on_ping".to_owned(), payload.clone())]
    );
    assert_eq!(wait_json(&peer, "EVENT ping ", CALL), payload);
    assert!(rx.try_recv().is_err(), "one event per route");

    rt.stop(sink);
}

/// Item 5, microfw -> micro_framework: a micro_framework `EventListener` declared the events
/// exchange of microfw's service auto-delete; microfw's `Producer` (Nameko dialect by default,
/// not auto-delete) adopts it and its events reach the micro_framework handler.
#[test]
fn microfw_events_reach_a_micro_framework_listener_adopting_its_exchange() {
    let venv = peer_or_skip!(PythonPeers::micro_framework());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let peer = mf_service(&venv, &vhost, &[("EVENT_SOURCE", "mfw_src")]);
    vhost.wait_for_queue("mfw_src.ping__mf_echo.on_ping", 1, READY).unwrap();
    assert_eq!(exchange_flags(&vhost, "mfw_src.events"), Some((true, true)));

    let src = rt.start(Runner::new(config(&vhost, "mfw_src")));
    rt.wait("dispatch", src.producer().dispatch("ping", &json!({"n": 1, "s": "hé"}))).unwrap();
    assert_eq!(wait_json(&peer, "EVENT ping ", CALL), json!({"n": 1, "s": "hé"}));
    assert_eq!(exchange_flags(&vhost, "mfw_src.events"), Some((true, true)), "adopted as it is");

    rt.stop(src);
}

/// Item 5, microfw first: a microfw service whose `AMQP_DIALECT` is `micro_framework` declares
/// its events exchange as micro_framework does (auto-delete), so a micro_framework listener
/// started afterwards declares it without a conflict and receives its events.
#[test]
fn microfw_in_the_micro_framework_dialect_declares_events_exchanges_micro_framework_accepts() {
    let venv = peer_or_skip!(PythonPeers::micro_framework());
    let vhost = TestVhost::create().unwrap();
    let rt = Rt::new();
    let mut cfg = config(&vhost, "mfw_src");
    cfg.amqp_dialect = Dialect::MicroFramework;
    let src = rt.start(Runner::new(cfg));
    // Nobody listens yet: the event is dropped, but the exchange now exists.
    rt.wait("first dispatch", src.producer().dispatch("ping", &json!("lost"))).unwrap();
    assert_eq!(exchange_flags(&vhost, "mfw_src.events"), Some((true, true)));

    let peer = mf_service(&venv, &vhost, &[("EVENT_SOURCE", "mfw_src")]);
    vhost.wait_for_queue("mfw_src.ping__mf_echo.on_ping", 1, READY).unwrap();
    rt.wait("dispatch", src.producer().dispatch("ping", &json!({"n": 2}))).unwrap();
    assert_eq!(wait_json(&peer, "EVENT ping ", CALL), json!({"n": 2}));
    let clients = run_all(vec![mf_client(&venv, &vhost, &["mf_echo", "echo", r#"["still up"]"#])]);
    assert_eq!(json_after(&clients[0], "RESULT "), json!("still up"));

    rt.stop(src);
}
