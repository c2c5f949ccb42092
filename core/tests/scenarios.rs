//! Simulator scenarios: one test per Engine behaviour, on the virtual clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use microfw_core::extract::{Attempt, Context, Failure, Params, Payload, State, Tick};
use microfw_core::testing::{Record, Simulator};
use microfw_core::{
    CallError, CallbackRoute, Destination, EngineConfig, EngineEvent, EventListener, HandlerError, Outcome,
    Reply, RetryPolicy, Route, RpcListener, RunnerContext, Service, Settle, ShutdownMode, TimeEntrypoint,
};
use serde::Deserialize;
use serde_json::{Value, json};

fn events(records: &[Record]) -> Vec<&EngineEvent> {
    records.iter().filter_map(|r| if let Record::Event(e) = r { Some(e) } else { None }).collect()
}

fn count(records: &[Record], pred: impl Fn(&Record) -> bool) -> usize {
    records.iter().filter(|r| pred(r)).count()
}

fn ok_event(Payload(_): Payload<Value>) {}

#[test]
fn filter_false_is_acked_without_a_run() {
    let listener = EventListener::new("src", "evt").filter(|p| p["keep"] == json!(true));
    let service =
        Service::new("svc").context(RunnerContext::new(1).route(Route::blocking(listener, "h", ok_event)));
    let mut sim = Simulator::new();
    let node = sim.add_service(service).unwrap();
    sim.take_records(node);

    sim.publish_event("src", "evt", &json!({"keep": false}));
    assert_eq!(sim.pending().count(), 0);
    let records = sim.take_records(node);
    assert!(
        matches!(records.as_slice(), [Record::Event(EngineEvent::Filtered { .. }), Record::Ack]),
        "{records:?}"
    );
    assert_eq!(sim.broker().queue_len("evt-src-evt--svc.h"), Some(0));
}

#[test]
fn translators_run_as_a_chain_each_seeing_the_previous_output() {
    #[derive(Deserialize, Debug, PartialEq)]
    struct Out {
        n: i64,
        tag: String,
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let route = Route::blocking(EventListener::new("src", "evt"), "h", move |Payload(out): Payload<Out>| {
        seen2.lock().unwrap().push(out);
    })
    .translator(|v| Ok(json!({"n": v["n"].as_i64().unwrap_or(0) * 10})))
    .translator(|v| Ok(json!({"n": v["n"].as_i64().unwrap_or(0) + 1, "tag": "second"})));
    let mut sim = Simulator::new();
    sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
    sim.publish_event("src", "evt", &json!({"n": 4}));
    assert_eq!(sim.run_all(), 1);
    assert_eq!(*seen.lock().unwrap(), vec![Out { n: 41, tag: "second".into() }]);
}

#[test]
fn failing_translator_dead_letters_without_retry() {
    let route = Route::blocking(EventListener::new("src", "evt"), "h", ok_event)
        .translator(|_| Err("cannot translate".into()))
        .retry(RetryPolicy::fixed(5, Duration::from_secs(1)));
    let mut sim = Simulator::new();
    let node = sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
    sim.take_records(node);
    sim.publish_event("src", "evt", &json!({}));
    assert_eq!(sim.run_all(), 0);
    let records = sim.take_records(node);
    assert!(matches!(events(&records)[0], EngineEvent::Rejected { .. }), "{records:?}");
    assert_eq!(count(&records, |r| matches!(r, Record::Publish(Destination::DeadLetter { .. }))), 1);
    assert_eq!(count(&records, |r| matches!(r, Record::Ack)), 1);
    assert_eq!(sim.broker().queue_len("microfw.dlq.evt-src-evt--svc.h"), Some(1));
    assert_eq!(sim.broker().queue_len("evt-src-evt--svc.h"), Some(0));
}

#[test]
fn undecodable_payload_is_rejected_once_and_never_requeued() {
    let route = Route::blocking(EventListener::new("src", "evt"), "h", ok_event).on_give_up(Settle::Ack);
    let mut sim = Simulator::new();
    let node = sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
    sim.take_records(node);
    let envelope = microfw_core::Envelope::raw("src.events", "evt", &b"{not json"[..]);
    let now = sim.now();
    sim.broker_mut().publish(now, "src.events", envelope).unwrap();
    sim.settle();
    assert_eq!(sim.run_all(), 1);
    let records = sim.take_records(node);
    // The handler's Payload extractor rejects it: one run, acked, no retry, no requeue.
    assert_eq!(count(&records, |r| matches!(r, Record::Dispatch { .. })), 1);
    assert_eq!(count(&records, |r| matches!(r, Record::Ack)), 1);
    assert_eq!(count(&records, |r| matches!(r, Record::Reject { .. })), 0);
    assert!(matches!(events(&records)[0], EngineEvent::Rejected { .. }));
}

/// Fails the first `fail` runs, then succeeds; counts runs.
#[derive(Clone, Default)]
struct Flaky {
    runs: Arc<AtomicU32>,
    fail: u32,
}

fn flaky(State(f): State<Flaky>, attempt: Attempt, Payload(_): Payload<Value>) -> Result<(), HandlerError> {
    let run = f.runs.fetch_add(1, Ordering::SeqCst);
    assert_eq!(attempt.retry_count, run, "the attempt header travels with the message");
    if run < f.fail { Err(HandlerError::retryable("Busy", format!("run {run}"))) } else { Ok(()) }
}

#[test]
fn retry_delays_are_exact_and_the_callback_runs_after_the_last_retry() {
    let state = Flaky { runs: Arc::default(), fail: u32::MAX };
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failures2 = failures.clone();
    let callback =
        CallbackRoute::blocking("on_failure", move |Failure(e): Failure, Payload(p): Payload<Value>| {
            failures2.lock().unwrap().push((e.error.message, p));
        });
    let route = Route::blocking(EventListener::new("src", "evt"), "h", flaky)
        .retry(RetryPolicy::exponential(3, Duration::from_millis(100), Duration::from_secs(10)))
        .callback(callback);
    let service = Service::with_state("svc", state.clone()).context(RunnerContext::new(2).route(route));
    let mut sim = Simulator::new();
    let node = sim.add_service(service).unwrap();
    let start = sim.now();
    sim.take_records(node);

    sim.publish_event("src", "evt", &json!({"id": 7}));
    let mut run_times = Vec::new();
    loop {
        while sim.pending().count() > 0 {
            run_times.push(sim.now() - start);
            sim.run_next();
        }
        if sim.advance_to_next_deadline().is_none() {
            break;
        }
    }
    // Four runs of the route (first + 3 retries) and one of the callback.
    assert_eq!(state.runs.load(Ordering::SeqCst), 4);
    let ms = |n| Duration::from_millis(n);
    assert_eq!(run_times, vec![ms(0), ms(100), ms(300), ms(700), ms(700)]);
    let records = sim.take_records(node);
    let retry_delays: Vec<Duration> = records
        .iter()
        .filter_map(|r| match r {
            Record::Publish(Destination::Retry { delay, .. }) => Some(*delay),
            _ => None,
        })
        .collect();
    assert_eq!(retry_delays, vec![ms(100), ms(200), ms(400)]);
    assert_eq!(*failures.lock().unwrap(), vec![("run 3".to_owned(), json!({"id": 7}))]);
    // After the callback: dead-lettered (the event default), then acked.
    let tail: Vec<&Record> = records.iter().rev().take(3).collect();
    assert!(matches!(tail[0], Record::Ack), "{records:?}");
    assert!(matches!(tail[1], Record::Publish(Destination::DeadLetter { .. })), "{records:?}");
    assert_eq!(sim.broker().queue_len("microfw.dlq.evt-src-evt--svc.h"), Some(1));
    // Every delivery of the message (first + 3 retries) was acked exactly once.
    assert_eq!(count(&records, |r| matches!(r, Record::Ack)), 4);
}

#[test]
fn a_retry_that_succeeds_settles_with_one_ack_and_no_dead_letter() {
    let state = Flaky { runs: Arc::default(), fail: 1 };
    let route = Route::blocking(EventListener::new("src", "evt"), "h", flaky)
        .retry(RetryPolicy::fixed(3, Duration::from_millis(250)));
    let mut sim = Simulator::new();
    let node = sim
        .add_service(Service::with_state("svc", state.clone()).context(RunnerContext::new(1).route(route)))
        .unwrap();
    sim.publish_event("src", "evt", &json!(1));
    sim.run_for(Duration::from_secs(5));
    assert_eq!(state.runs.load(Ordering::SeqCst), 2);
    let records = sim.take_records(node);
    assert_eq!(count(&records, |r| matches!(r, Record::Publish(Destination::DeadLetter { .. }))), 0);
    assert_eq!(sim.broker().queue_len("evt-src-evt--svc.h"), Some(0));
}

#[test]
fn non_retryable_errors_give_up_at_once() {
    let route = Route::blocking(EventListener::new("src", "evt"), "h", |Payload(_): Payload<Value>| {
        Err::<(), _>(HandlerError::fatal("ValueError", "bad"))
    })
    .retry(RetryPolicy::fixed(3, Duration::from_millis(250)))
    .on_give_up(Settle::Ack);
    let mut sim = Simulator::new();
    let node = sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
    sim.take_records(node);
    sim.publish_event("src", "evt", &json!(1));
    sim.run_all();
    let records = sim.take_records(node);
    assert!(matches!(events(&records)[..], [EngineEvent::GaveUp { .. }]), "{records:?}");
    assert_eq!(records.last(), Some(&Record::Ack));
}

#[test]
fn budget_holds_deliveries_beyond_max_workers_and_loses_none() {
    // Prefetch 5 over a budget of 2: the link hands over 5, the Engine runs 2 and holds 3.
    let service = Service::new("svc").context(RunnerContext::new(2).prefetch(5).route(Route::blocking(
        EventListener::new("src", "evt"),
        "h",
        ok_event,
    )));
    let mut sim = Simulator::new();
    let node = sim.add_service(service).unwrap();
    for i in 0..6 {
        sim.publish_event("src", "evt", &json!(i));
    }
    assert_eq!(sim.pending().count(), 2);
    assert_eq!(sim.engine(node).stats().held, 3);
    assert_eq!(sim.broker().queue_len("evt-src-evt--svc.h"), Some(1), "prefetch bounds what is held");
    let first = sim.pending().next().map(|p| p.id).unwrap();
    sim.complete(node, first, Outcome::Success(None));
    assert_eq!(sim.pending().count(), 2);
    assert_eq!(sim.engine(node).stats().held, 3, "the freed prefetch slot brought the 6th message in");
    assert_eq!(sim.broker().queue_len("evt-src-evt--svc.h"), Some(0));
    assert_eq!(sim.run_all(), 5);
    let records = sim.take_records(node);
    assert_eq!(count(&records, |r| matches!(r, Record::Ack)), 6);
}

#[test]
fn prefetch_defaults_to_the_budget_so_the_broker_keeps_the_rest() {
    let service = Service::new("svc").context(RunnerContext::new(2).route(Route::blocking(
        EventListener::new("src", "evt"),
        "h",
        ok_event,
    )));
    let mut sim = Simulator::new();
    let node = sim.add_service(service).unwrap();
    for i in 0..5 {
        sim.publish_event("src", "evt", &json!(i));
    }
    assert_eq!(sim.pending().count(), 2);
    assert_eq!(sim.engine(node).stats().held, 0);
    assert_eq!(sim.broker().queue_len("evt-src-evt--svc.h"), Some(3));
    assert_eq!(sim.run_all(), 5);
}

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

fn add(Params(p): Params<AddArgs>) -> Reply<i64> {
    Reply(p.a + p.b)
}

fn rpc_pair() -> (Simulator, microfw_core::testing::NodeId, microfw_core::testing::NodeId) {
    let server =
        Service::new("math").context(
            RunnerContext::new(2).route(Route::blocking(RpcListener::new(), "add", add)).route(
                Route::blocking(RpcListener::new(), "fail", |Params(()): Params<()>| {
                    Err::<(), _>(HandlerError::fatal("ValueError", "nope").in_module("builtins"))
                }),
            ),
        );
    let client = Service::new("client");
    let mut sim = Simulator::new();
    let s = sim.add_service(server).unwrap();
    let c = sim.add_service(client).unwrap();
    (sim, s, c)
}

#[test]
fn rpc_binds_positional_and_keyword_arguments_and_replies() {
    let (mut sim, _, client) = rpc_pair();
    let positional = sim.call(client, "math", "add", json!([1, 2]), json!({}));
    let mixed = sim.call(client, "math", "add", json!([10]), json!({"b": 5}));
    sim.run_all();
    assert_eq!(sim.call_result(client, positional), Some(&Ok(json!(3))));
    assert_eq!(sim.call_result(client, mixed), Some(&Ok(json!(15))));
}

#[test]
fn rpc_errors_are_typed_replies() {
    let (mut sim, server, client) = rpc_pair();
    let remote = sim.call(client, "math", "fail", json!([]), json!({}));
    let unknown = sim.call(client, "math", "nope", json!([]), json!({}));
    let bad_args = sim.call(client, "math", "add", json!([1, 2, 3]), json!({}));
    sim.run_all();
    let err = |c| match sim.call_result(client, c) {
        Some(Err(CallError::Remote(e))) => (e.exc_type.clone(), e.path()),
        other => panic!("{other:?}"),
    };
    assert_eq!(err(remote), ("ValueError".into(), "builtins.ValueError".into()));
    assert_eq!(err(unknown), ("MethodNotFound".into(), "nameko.exceptions.MethodNotFound".into()));
    assert_eq!(err(bad_args).0, "IncorrectSignature");
    let records = sim.take_records(server);
    assert!(
        events(&records)
            .iter()
            .any(|e| matches!(e, EngineEvent::MethodNotFound { method } if method == "nope"))
    );
    // Every request was acked once, after its reply.
    assert_eq!(count(&records, |r| matches!(r, Record::Ack)), 3);
}

#[test]
fn rpc_timeout_resolves_the_call_at_its_deadline_and_a_late_reply_is_dropped() {
    let (mut sim, server, client) = rpc_pair();
    let start = sim.now();
    let call = sim.call_with(
        client,
        "math",
        "add",
        json!([1, 1]),
        json!({}),
        Some(Duration::from_secs(2)),
        microfw_core::Transport::Broker,
    );
    assert_eq!(sim.call_result(client, call), None);
    let dispatch = sim.pending().next().map(|p| p.id).unwrap();
    assert_eq!(sim.advance_to_next_deadline(), Some(start + Duration::from_secs(2)));
    assert_eq!(sim.call_result(client, call), Some(&Err(CallError::Timeout(Duration::from_secs(2)))));
    // The server finishes late: its reply has no caller any more.
    sim.complete(server, dispatch, Outcome::Success(Some(json!(2))));
    let records = sim.take_records(client);
    assert!(events(&records).iter().any(|e| matches!(e, EngineEvent::UnknownReply { .. })), "{records:?}");
    assert_eq!(sim.engine(client).stats().unknown_replies, 1);
    assert_eq!(count(&records, |r| matches!(r, Record::Resolve(_))), 1);
}

#[test]
fn rpc_to_a_service_nobody_serves_fails_at_once_with_unknown_service() {
    let (mut sim, _, client) = rpc_pair();
    let call = sim.call(client, "ghost", "boo", json!([]), json!({}));
    assert_eq!(sim.call_result(client, call), Some(&Err(CallError::UnknownService("ghost".into()))));
}

#[test]
fn reply_queue_lost_fails_pending_calls_but_nothing_else_does() {
    let (mut sim, _, client) = rpc_pair();
    let call = sim.call(client, "math", "add", json!([1, 1]), json!({}));
    assert_eq!(sim.call_result(client, call), None);
    // The simulator exposes the Engine read-only; drive the input through a fresh Engine.
    let (spec, _) = Service::new("c2").build().unwrap();
    let mut engine = microfw_core::Engine::new(&spec, EngineConfig::default());
    let now = sim.now();
    engine.handle_start(now);
    let id = engine.handle_call(
        now,
        microfw_core::OutgoingCall {
            context: None,
            service: "math".into(),
            method: "add".into(),
            args: vec![],
            kwargs: Default::default(),
            timeout: None,
            transport: microfw_core::Transport::Broker,
            dialect: microfw_core::Dialect::Nameko,
        },
    );
    while engine.poll_action().is_some() {}
    engine.handle_reply_queue_lost(now, microfw_core::Transport::Broker);
    let resolved: Vec<_> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert!(
        matches!(resolved.as_slice(), [microfw_core::Action::Resolve { call, result: Err(CallError::ReplyQueueLost) }] if *call == id),
        "{resolved:?}"
    );
}

#[test]
fn context_propagates_the_call_id_stack_to_calls_made_by_a_worker() {
    let service = Service::new("echo").context(RunnerContext::new(1).route(Route::blocking(
        RpcListener::new(),
        "nested",
        |Context(ctx): Context, Params(()): Params<()>| Reply(ctx.call_id_stack()),
    )));
    let mut sim = Simulator::new();
    sim.add_service(service).unwrap();
    let client = sim.add_service(Service::new("caller")).unwrap();
    let call = sim.call(client, "echo", "nested", json!([]), json!({}));
    sim.run_all();
    let Some(Ok(Value::Array(stack))) = sim.call_result(client, call) else { panic!() };
    assert_eq!(stack.len(), 2, "{stack:?}");
    assert!(stack[0].as_str().unwrap().starts_with("caller.standalone_rpc_call."));
    assert!(stack[1].as_str().unwrap().starts_with("echo.nested."));
}

#[test]
fn timers_fire_on_the_interval_with_their_timestamp_and_never_overlap() {
    let ticks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ticks2 = ticks.clone();
    let route = Route::blocking(TimeEntrypoint::new(Duration::from_secs(1)), "tick", move |Tick(t): Tick| {
        ticks2.lock().unwrap().push(t);
    });
    let mut sim = Simulator::new();
    let node = sim.add_service(Service::new("svc").context(RunnerContext::new(4).route(route))).unwrap();
    let start = sim.now();
    sim.run_for(Duration::from_millis(3_500));
    let secs = |n| start + Duration::from_secs(n);
    assert_eq!(*ticks.lock().unwrap(), vec![secs(1), secs(2), secs(3)]);

    // A run that outlasts several intervals: the ticks that fall meanwhile coalesce into one.
    sim.advance(Duration::from_millis(500)); // t = 4 s: a tick is dispatched, not completed
    assert_eq!(sim.pending().count(), 1);
    sim.advance(Duration::from_secs(3)); // t = 7 s: ticks at 5, 6 and 7 s fall during the run
    assert_eq!(sim.pending().count(), 1, "runs never overlap");
    sim.run_next(); // the slow run ends; one coalesced run starts at once
    assert_eq!(sim.pending().count(), 1);
    let records = sim.take_records(node);
    assert_eq!(count(&records, |r| matches!(r, Record::Event(EngineEvent::TimerCoalesced { .. }))), 3);
}

#[test]
fn a_failing_timer_keeps_firing() {
    let route = Route::blocking(TimeEntrypoint::new(Duration::from_secs(1)), "tick", |Tick(_): Tick| {
        Err::<(), _>("always fails")
    });
    let mut sim = Simulator::new();
    let node = sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
    assert_eq!(sim.run_for(Duration::from_millis(5_500)), 5);
    let records = sim.take_records(node);
    assert_eq!(count(&records, |r| matches!(r, Record::Event(EngineEvent::GaveUp { .. }))), 5);
}

fn shutdown_scenario(mode: ShutdownMode) -> (usize, usize, Vec<Record>, usize) {
    let ctx = RunnerContext::new(1).shutdown_mode(mode).prefetch(4).route(Route::blocking(
        EventListener::new("src", "evt"),
        "h",
        ok_event,
    ));
    let mut sim = Simulator::new();
    let node = sim.add_service(Service::new("svc").context(ctx)).unwrap();
    for i in 0..4 {
        sim.publish_event("src", "evt", &json!(i));
    }
    assert_eq!(sim.pending().count(), 1);
    sim.take_records(node);
    sim.shutdown(node);
    let ran = sim.run_all();
    let records = sim.take_records(node);
    let in_queue = sim.broker().queue_len("evt-src-evt--svc.h").unwrap_or(0);
    (ran, in_queue, records, sim.engine(node).stats().running)
}

#[test]
fn shutdown_thread_mode_finishes_running_work_and_hands_back_the_rest() {
    let (ran, in_queue, records, running) = shutdown_scenario(ShutdownMode::FinishRunning);
    assert_eq!(ran, 1, "only the running job finishes");
    assert_eq!(count(&records, |r| matches!(r, Record::Reject { requeue: true })), 3);
    assert_eq!(count(&records, |r| matches!(r, Record::Ack)), 1);
    assert_eq!(in_queue, 3, "nothing lost: the 3 unstarted messages are back in the queue");
    assert_eq!(running, 0);
    assert!(matches!(records.last(), Some(Record::Stopped { unfinished: 0 })), "{records:?}");
}

#[test]
fn shutdown_greedy_mode_runs_everything_pending_first() {
    let (ran, in_queue, records, _) = shutdown_scenario(ShutdownMode::DrainPending);
    assert_eq!(ran, 4);
    assert_eq!(count(&records, |r| matches!(r, Record::Ack)), 4);
    assert_eq!(in_queue, 0);
    assert!(matches!(records.last(), Some(Record::Stopped { unfinished: 0 })), "{records:?}");
}

#[test]
fn shutdown_gives_up_at_the_timeout_leaving_work_unacked() {
    let ctx = RunnerContext::new(1).route(Route::blocking(EventListener::new("src", "evt"), "h", ok_event));
    let mut sim = Simulator::new();
    let config = EngineConfig { shutdown_timeout: Duration::from_secs(5), ..EngineConfig::default() };
    let node = sim.add_service_with(Service::new("svc").context(ctx), config).unwrap();
    sim.publish_event("src", "evt", &json!(1));
    sim.shutdown(node);
    sim.take_records(node);
    sim.advance(Duration::from_secs(5));
    let records = sim.take_records(node);
    assert_eq!(records.last(), Some(&Record::Stopped { unfinished: 1 }));
    assert!(sim.engine(node).is_stopped());
}

static DECODES: AtomicU32 = AtomicU32::new(0);

/// A payload type that counts how often it is deserialized.
#[derive(Debug, PartialEq)]
struct Counted {
    amount: u64,
}

impl<'de> serde::Deserialize<'de> for Counted {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            amount: u64,
        }
        DECODES.fetch_add(1, Ordering::SeqCst);
        Raw::deserialize(d).map(|r| Counted { amount: r.amount })
    }
}

#[test]
fn a_typed_filter_decodes_once_and_hands_its_value_to_the_handler() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let seen_raw = Arc::new(AtomicU32::new(0));
    let seen_raw2 = seen_raw.clone();
    let typed = Route::blocking(
        EventListener::new("src", "evt").filter_as(|c: &Counted| c.amount > 10),
        "typed",
        move |Payload(c): Payload<Counted>| seen2.lock().unwrap().push(c.amount),
    );
    // Same filter type, but the handler wants JSON: it decodes the raw body itself.
    let other = Route::blocking(
        EventListener::new("src", "evt").filter_as(|c: &Counted| c.amount > 10),
        "other",
        move |Payload(v): Payload<Value>| {
            assert_eq!(v["amount"], json!(50));
            seen_raw2.fetch_add(1, Ordering::SeqCst);
        },
    );
    let mut sim = Simulator::new();
    let node = sim
        .add_service(Service::new("svc").context(RunnerContext::new(2).route(typed).route(other)))
        .unwrap();
    DECODES.store(0, Ordering::SeqCst);
    sim.publish_event("src", "evt", &json!({"amount": 5}));
    sim.publish_event("src", "evt", &json!({"amount": 50}));
    sim.run_all();
    assert_eq!(*seen.lock().unwrap(), vec![50]);
    assert_eq!(seen_raw.load(Ordering::SeqCst), 1);
    // Two messages, each read once per route by its filter, never again by the handlers.
    assert_eq!(DECODES.load(Ordering::SeqCst), 4);
    let records = sim.take_records(node);
    assert_eq!(count(&records, |r| matches!(r, Record::Event(EngineEvent::Filtered { .. }))), 2);
    assert_eq!(count(&records, |r| matches!(r, Record::Ack)), 4);
}

#[test]
fn a_typed_filter_that_cannot_decode_rejects_the_message() {
    // Not `Counted`: its global decode counter belongs to the test above, which runs in parallel.
    #[derive(Deserialize)]
    struct Amount {
        amount: u64,
    }
    let route =
        Route::blocking(EventListener::new("src", "evt").filter_as(|a: &Amount| a.amount > 0), "h", ok_event)
            .on_give_up(Settle::Ack);
    let mut sim = Simulator::new();
    let node = sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
    sim.take_records(node);
    sim.publish_event("src", "evt", &json!({"amount": "lots"}));
    assert_eq!(sim.run_all(), 0);
    let records = sim.take_records(node);
    assert!(
        matches!(records.as_slice(), [Record::Event(EngineEvent::Rejected { .. }), Record::Ack]),
        "{records:?}"
    );
}

fn micro_framework_call(method: &str, args: Value) -> microfw_core::OutgoingCall {
    microfw_core::OutgoingCall {
        context: None,
        service: "math".into(),
        method: method.into(),
        args: match args {
            Value::Array(a) => a,
            _ => vec![],
        },
        kwargs: Default::default(),
        timeout: None,
        transport: microfw_core::Transport::Broker,
        dialect: microfw_core::Dialect::MicroFramework,
    }
}

#[test]
fn micro_framework_target_listings_are_answered_from_the_routes() {
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Scale {
        value: f64,
        factor: Option<f64>,
    }
    let mf = RpcListener::new().dialect(microfw_core::Dialect::MicroFramework);
    let server = Service::new("math").context(
        RunnerContext::new(1)
            .route(
                Route::blocking(mf, "scale", |Params(s): Params<Scale>| {
                    Reply(s.value * s.factor.unwrap_or(1.0))
                })
                .doc("Scales a value."),
            )
            .route(Route::blocking(mf, "pair", |Params((a, b)): Params<(i64, i64)>| Reply(a + b))),
    );
    let mut sim = Simulator::new();
    sim.add_service(server).unwrap();
    let client = sim.add_service(Service::new("client")).unwrap();
    let list = sim.call_raw(client, micro_framework_call("__list_targets__", json!([])));
    let one = sim.call_raw(client, micro_framework_call("__get_target__", json!(["scale"])));
    let unknown = sim.call_raw(client, micro_framework_call("__get_target__", json!(["nope"])));
    let missing = sim.call_raw(client, micro_framework_call("__get_target__", json!([])));
    let scaled = sim.call_raw(client, micro_framework_call("scale", json!([2.0, 3.0])));
    assert_eq!(sim.run_all(), 1, "listings take no worker: only the real call ran");
    let scale =
        json!({"target": "scale", "args": ["value"], "kwargs": ["factor"], "docstring": "Scales a value."});
    let pair = json!({"target": "pair", "args": [], "kwargs": [], "docstring": null});
    assert_eq!(sim.call_result(client, list), Some(&Ok(json!([scale, pair]))));
    assert_eq!(sim.call_result(client, one), Some(&Ok(scale)));
    let error = |c| match sim.call_result(client, c) {
        Some(Err(CallError::Remote(e))) => (e.exc_type.clone(), e.message.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(error(unknown), ("KeyError".to_owned(), "'nope'".to_owned()));
    assert_eq!(error(missing).0, "TypeError");
    assert_eq!(sim.call_result(client, scaled), Some(&Ok(json!(6.0))));
}

#[test]
fn nameko_has_no_internal_commands() {
    let (mut sim, _, client) = rpc_pair();
    let call = sim.call(client, "math", "__list_targets__", json!([]), json!({}));
    assert!(
        matches!(sim.call_result(client, call), Some(Err(CallError::Remote(e))) if e.exc_type == "MethodNotFound")
    );
}

#[test]
fn engine_events_read_with_route_names_at_the_right_level() {
    let state = Flaky { runs: Arc::default(), fail: u32::MAX };
    let route = Route::blocking(EventListener::new("src", "evt"), "billing", flaky)
        .retry(RetryPolicy::fixed(1, Duration::from_millis(100)));
    let mut sim = Simulator::new();
    let node = sim
        .add_service(Service::with_state("svc", state).context(RunnerContext::new(1).route(route)))
        .unwrap();
    sim.publish_event("src", "evt", &json!(1));
    sim.run_for(Duration::from_secs(1));
    let records = sim.take_records(node);
    let texts: Vec<(microfw_core::Severity, String)> = events(&records)
        .into_iter()
        .map(|e| (e.severity(), sim.engine(node).describe(e).to_string()))
        .collect();
    use microfw_core::Severity::Info;
    assert_eq!(
        texts,
        vec![
            (Info, "route billing: retry 1 in 100ms after Busy: run 0".to_owned()),
            (Info, "route billing: gave up after Busy: run 1".to_owned()),
            (Info, "route billing: message dead-lettered".to_owned()),
        ]
    );
}
