//! Smoke tests of the Python-peer harness: real nameko 2.14.1 and micro_framework 2.0.16
//! processes talking to each other (Python <-> Python) through per-test vhosts.
//!
//! They need `python3` (else they print `SKIPPED: ...` and pass), PyPI access on the first run
//! (venvs are cached, see `PythonPeers::cache_dir`), and RabbitMQ at 127.0.0.1:5672 with
//! `rabbitmqctl` on PATH.

use std::process::Command;
use std::time::Duration;

use microfw_tests::{
    DEFAULT_STOP_GRACE, ProcessError, PythonPeers, PythonProcess, TestVhost, free_tcp_port, peer_or_skip,
};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(60);
const CALL: Duration = Duration::from_secs(60);

/// Parses the JSON after `prefix` in the first stdout line starting with `prefix`.
fn json_after(process: &PythonProcess, prefix: &str) -> Value {
    let line = process.wait_for_line(prefix, Duration::ZERO).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&line[prefix.len()..]).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn nameko_service_answers_cluster_rpc_proxy_and_handles_events() {
    let venv = peer_or_skip!(PythonPeers::nameko());
    let vhost = TestVhost::create().unwrap();
    let uri = vhost.amqp_uri();
    let env = [("AMQP_URI", uri.as_str())];

    let mut service = PythonProcess::spawn(&venv, "nameko_echo.py", &[], &env).unwrap();
    service.wait_for_line("READY", READY).unwrap();
    let queue = vhost.wait_for_queue("rpc-nameko_echo", 1, READY).unwrap();
    assert_eq!(queue.consumers, 1);

    let payload = r#"[{"n": 1, "s": "h\u00e9", "list": [true, null, 2.5]}]"#;
    let client =
        PythonProcess::run(&venv, "nameko_client.py", &["call", "nameko_echo", "echo", payload], &env, CALL)
            .unwrap();
    assert_eq!(json_after(&client, "RESULT "), json!({"n": 1, "s": "hé", "list": [true, null, 2.5]}));

    let failing = PythonProcess::run(
        &venv,
        "nameko_client.py",
        &["call", "nameko_echo", "fail", r#"["boom"]"#],
        &env,
        CALL,
    )
    .unwrap();
    assert_eq!(json_after(&failing, "ERROR ValueError "), json!("boom"));

    let dispatcher = PythonProcess::run(
        &venv,
        "nameko_client.py",
        &["dispatch", "pinger", "ping", r#"{"k": [1, 2]}"#],
        &env,
        CALL,
    )
    .unwrap();
    dispatcher.wait_for_line("DISPATCHED", Duration::ZERO).unwrap();
    let event = service.wait_for_line("EVENT ping ", CALL).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&event["EVENT ping ".len()..]).unwrap(), json!({"k": [1, 2]}));

    // SIGINT reaches the service and it shuts down gracefully.
    let status = service.stop(DEFAULT_STOP_GRACE).unwrap();
    assert!(status.success(), "{status}\n{}", service.dump());
    service.wait_for_line("STOPPED", Duration::ZERO).unwrap();
}

#[test]
fn micro_framework_serves_amqp_and_websocket_rpc_with_py311_fixes() {
    let venv = peer_or_skip!(PythonPeers::micro_framework());
    let vhost = TestVhost::create().unwrap();
    let uri = vhost.amqp_uri();
    let port = free_tcp_port().unwrap().to_string();
    let env = [("AMQP_URI", uri.as_str()), ("WEBSOCKET_PORT", port.as_str())];

    let mut service = PythonProcess::spawn(&venv, "mf_service.py", &[], &env).unwrap();
    service.wait_for_line("READY", READY).unwrap();
    // The broadcast queue carries __list_targets__, which every client proxy sends first.
    vhost.wait_for_queue("rpc-mf_echo-broadcast", 1, READY).unwrap();

    let ws =
        PythonProcess::run(&venv, "mf_client.py", &["ws", &port, "ws_add", "[2]", r#"{"b": 5}"#], &env, CALL)
            .unwrap();
    assert_eq!(json_after(&ws, "RESULT "), json!(7));
    let ws_echo = PythonProcess::run(
        &venv,
        "mf_client.py",
        &["ws", &port, "ws_echo", r#"[{"x": [1, "two"]}]"#],
        &env,
        CALL,
    )
    .unwrap();
    assert_eq!(json_after(&ws_echo, "RESULT "), json!({"x": [1, "two"]}));

    let amqp = PythonProcess::run(
        &venv,
        "mf_client.py",
        &["amqp", "mf_echo", "add", "[40]", r#"{"b": 2}"#],
        &env,
        CALL,
    )
    .unwrap();
    assert_eq!(json_after(&amqp, "RESULT "), json!(42));
    let amqp_echo =
        PythonProcess::run(&venv, "mf_client.py", &["amqp", "mf_echo", "echo", r#"["hé"]"#], &env, CALL)
            .unwrap();
    assert_eq!(json_after(&amqp_echo, "RESULT "), json!("hé"));

    let status = service.stop(DEFAULT_STOP_GRACE).unwrap();
    assert!(status.success(), "{status}\n{}", service.dump());
    service.wait_for_line("STOPPED", Duration::ZERO).unwrap();
}

#[test]
fn early_exit_is_reported_with_the_scripts_output() {
    let venv = peer_or_skip!(PythonPeers::nameko());
    let mut client = PythonProcess::spawn(&venv, "nameko_client.py", &["bogus"], &[]).unwrap();
    let err = client.wait_for_line("RESULT", READY).unwrap_err();
    assert!(matches!(err, ProcessError::Exited { .. }), "{err}");
    assert!(err.to_string().contains("Usage"), "{err}");
    assert_eq!(client.wait_for_exit(READY).unwrap().code(), Some(2));
}

#[test]
fn test_vhost_is_deleted_on_drop_even_after_a_panic() {
    let vhost = TestVhost::create().unwrap();
    let name = vhost.name().to_owned();
    assert!(list_vhosts().contains(&name));
    let panicked = std::thread::spawn(move || {
        let _owned = vhost;
        panic!("simulated test failure");
    })
    .join();
    assert!(panicked.is_err());
    assert!(!list_vhosts().contains(&name), "{name} still exists");
}

fn list_vhosts() -> Vec<String> {
    let out = Command::new("rabbitmqctl").args(["list_vhosts", "-q", "--no-table-headers"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}
