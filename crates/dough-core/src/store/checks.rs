//! What every [`Store`] must do, as checks any store can be put through:
//! SQLite's unit test and PostgreSQL's integration test run the same ones.
//! (Test code, public so the integration tests can reach it.)
use std::sync::{Arc, Barrier};

use super::*;

fn req() -> TaskRequest {
    serde_json::from_str(r#"{"command": ["true"]}"#).unwrap()
}

/// Run every check. `open(name)` opens the store of database `name`
/// (empty the first time; the same data each time after): each check has
/// a database of its own.
pub fn all(open: &(dyn Fn(&str) -> Box<dyn Store> + Sync)) {
    a_task_walks_its_states_and_survives_reopening(open);
    output_from_returns_the_range_with_streams_and_offsets(&*open("output_from"));
    output_is_bounded_and_truncation_marked(&*open("bounded"));
    queue_order_is_priority_then_submission(&*open("queue"));
    results_resources_and_nodes_are_kept(&*open("kept"));
    a_task_is_claimed_once_among_racing_claimers(open);
    claims_in_a_batch_keep_order_and_resources(&*open("batch"));
    claim_next_offers_the_head_in_run_order(&*open("next"));
    writes_under_an_old_claim_are_fenced(&*open("fence"));
    a_silent_node_is_reaped_once_and_its_tasks_settled(&*open("reap"));
    artifacts_are_kept_fenced_and_deleted_with_their_task(open);
}

pub fn artifacts_are_kept_fenced_and_deleted_with_their_task(
    open: &dyn Fn(&str) -> Box<dyn Store>,
) {
    {
        let s = open("artifacts");
        s.insert("a1", &req()).unwrap();
        s.insert("a2", &req()).unwrap();
        let t = s.claim("a1", "n", "vm1", &[]).unwrap().unwrap();
        assert_eq!(s.artifact("a1", Artifact::Egress).unwrap(), None);
        s.put_artifact("a1", Some(t.epoch), Artifact::Egress, "{\"v\":1}")
            .unwrap();
        s.put_artifact("a1", Some(t.epoch), Artifact::Egress, "{\"v\":2}")
            .unwrap();
        s.put_artifact("a1", None, Artifact::Provenance, "signed")
            .unwrap();
        s.put_artifact("a2", None, Artifact::Egress, "other")
            .unwrap();
        // Not under a claim that moved on.
        assert!(matches!(
            s.put_artifact("a1", Some(t.epoch + 1), Artifact::Egress, "late"),
            Err(StoreError::Fenced { .. })
        ));
        assert!(matches!(
            s.artifact("nope", Artifact::Egress),
            Err(StoreError::NotFound(_))
        ));
        // A task in flight is not deleted.
        assert!(matches!(s.delete("a1"), Err(StoreError::InFlight { .. })));
    }
    // Kept across a reopening (a daemon's restart).
    let s = open("artifacts");
    assert_eq!(
        s.artifact("a1", Artifact::Egress).unwrap().as_deref(),
        Some("{\"v\":2}")
    );
    assert_eq!(
        s.artifact("a1", Artifact::Provenance).unwrap().as_deref(),
        Some("signed")
    );
    s.append_output("a1", None, 1, b"out", 1 << 20).unwrap();
    s.transition("a1", None, State::Failed, Some("x"), None, None)
        .unwrap();
    s.delete("a1").unwrap();
    assert!(matches!(s.get("a1"), Err(StoreError::NotFound(_))));
    assert!(matches!(
        s.artifact("a1", Artifact::Egress),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(s.delete("a1"), Err(StoreError::NotFound(_))));
    // Only its own: the other task keeps everything.
    assert_eq!(
        s.artifact("a2", Artifact::Egress).unwrap().as_deref(),
        Some("other")
    );
    // Its id can be used again, with nothing of the old task's.
    s.insert("a1", &req()).unwrap();
    assert_eq!(s.artifact("a1", Artifact::Provenance).unwrap(), None);
    assert!(s.logs("a1").unwrap().chunks.is_empty());
    assert_eq!(s.get("a1").unwrap().transitions.len(), 1);
}

pub fn a_task_walks_its_states_and_survives_reopening(open: &dyn Fn(&str) -> Box<dyn Store>) {
    {
        let s = open("walk");
        let t = s.insert("t1", &req()).unwrap();
        assert_eq!(t.state, State::Queued);
        assert_eq!((t.request.vcpus, t.request.memory_mib), (1, 512));
        assert_eq!(t.epoch, 0);
        s.claim("t1", "n", "abc", &[("vm", "abc")])
            .unwrap()
            .unwrap();
        s.transition("t1", None, State::Booting, None, None, None)
            .unwrap();
        // Illegal moves are refused and change nothing.
        assert!(matches!(
            s.transition("t1", None, State::Queued, None, None, None),
            Err(StoreError::BadTransition { .. })
        ));
        assert!(matches!(
            s.transition("nope", None, State::Failed, None, None, None),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(s.get("nope"), Err(StoreError::NotFound(_))));
    }
    let s = open("walk");
    let t = s.get("t1").unwrap();
    assert_eq!(t.state, State::Booting);
    assert_eq!(
        t.transitions.iter().map(|x| x.state).collect::<Vec<_>>(),
        [State::Queued, State::Provisioning, State::Booting]
    );
    assert!(t.transitions[0].at_ms <= t.transitions[2].at_ms);
    assert_eq!(s.in_flight().unwrap().len(), 1);
    assert_eq!(
        s.resources("t1").unwrap(),
        [("vm".to_string(), "abc".to_string())]
    );
    let t = s
        .transition(
            "t1",
            None,
            State::Failed,
            Some("orchestrator_restart"),
            Some("why"),
            Some(3),
        )
        .unwrap();
    assert!(t.state.is_terminal());
    assert!(s
        .transition("t1", None, State::Succeeded, None, None, None)
        .is_err());
    assert_eq!(t.reason.as_deref(), Some("orchestrator_restart"));
    assert_eq!((t.detail.as_deref(), t.exit_code), (Some("why"), Some(3)));
    assert!(s.in_flight().unwrap().is_empty());
    assert_eq!(s.list(Some(State::Failed), 10).unwrap().len(), 1);
    assert!(s.list(Some(State::Queued), 10).unwrap().is_empty());
}

pub fn output_from_returns_the_range_with_streams_and_offsets(s: &dyn Store) {
    s.insert("t", &req()).unwrap();
    s.append_output("t", None, 1, b"hello ", 100).unwrap();
    s.append_output("t", None, 2, b"err ", 100).unwrap();
    s.append_output("t", None, 1, b"world", 100).unwrap();
    let all = s.output_from("t", 0, 1 << 20).unwrap();
    assert_eq!(
        all,
        [
            (1, 0, b"hello ".to_vec()),
            (2, 6, b"err ".to_vec()),
            (1, 10, b"world".to_vec())
        ]
    );
    // From inside a chunk, and a limit that stops after the chunk that
    // reaches it.
    assert_eq!(s.output_from("t", 8, 2).unwrap(), [(2, 8, b"r ".to_vec())]);
    assert_eq!(
        s.output_from("t", 3, 4).unwrap(),
        [(1, 3, b"lo ".to_vec()), (2, 6, b"err ".to_vec())]
    );
    assert_eq!(
        s.output_from("t", 6, 1).unwrap(),
        [(2, 6, b"err ".to_vec())]
    );
    assert!(s.output_from("t", 15, 10).unwrap().is_empty());
    assert!(s.output_from("nope", 0, 10).is_err());
    // Many chunks (more than one page of a paged reader), in order.
    s.insert("many", &req()).unwrap();
    let mut want = vec![];
    for i in 0..100u32 {
        let line = format!("line {i}\n");
        s.append_output("many", None, 1 + (i % 2) as u8, line.as_bytes(), 1 << 20)
            .unwrap();
        want.extend_from_slice(line.as_bytes());
    }
    let got: Vec<u8> = s
        .output_from("many", 0, 1 << 20)
        .unwrap()
        .into_iter()
        .flat_map(|(_, _, d)| d)
        .collect();
    assert_eq!(got, want);
    assert_eq!(s.get("many").unwrap().output_bytes, want.len() as u64);
}

pub fn output_is_bounded_and_truncation_marked(s: &dyn Store) {
    s.insert("t", &req()).unwrap();
    assert!(s.append_output("t", None, 1, b"hello ", 10).unwrap());
    assert!(!s.append_output("t", None, 2, b"world!", 10).unwrap());
    assert!(!s.append_output("t", None, 1, b"more", 10).unwrap());
    let l = s.logs("t").unwrap();
    assert!(l.truncated);
    let all: Vec<u8> = l.chunks.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(all, b"hello worl");
    assert_eq!(l.chunks[1].0, 2);
    assert!(s.get("t").unwrap().output_truncated);
    assert!(s.logs("nope").is_err());
}

pub fn queue_order_is_priority_then_submission(s: &dyn Store) {
    let mut hi = req();
    hi.priority = 5;
    s.insert("a", &req()).unwrap();
    s.insert("b", &hi).unwrap();
    s.insert("c", &req()).unwrap();
    let q: Vec<String> = s.queued(100).unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(q, ["b", "a", "c"]);
    assert_eq!(s.queued(1).unwrap()[0].id, "b");
    assert_eq!(s.counts().unwrap()[&State::Queued], 3);
    // Newest first.
    let l: Vec<String> = s.list(None, 2).unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(l, ["c", "b"]);
    // A requeued task keeps its place (its submission order).
    s.transition("a", None, State::Provisioning, None, None, None)
        .unwrap();
    s.requeue("a").unwrap();
    let q: Vec<String> = s.queued(100).unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(q, ["b", "a", "c"]);
    assert_eq!(s.get("a").unwrap().vm_id, None);
}

pub fn results_resources_and_nodes_are_kept(s: &dyn Store) {
    s.insert("t", &req()).unwrap();
    s.claim(
        "t",
        "node-a",
        "vm1",
        &[("vm", "vm1"), ("netns", "/run/netns/x")],
    )
    .unwrap()
    .unwrap();
    s.set_image_digest("t", None, "sha256:ab").unwrap();
    let fin: crate::repo::Finalized = serde_json::from_value(serde_json::json!({
        "branch": "dough/t", "base": "main", "base_commit": "abc", "commits": [],
        "head": "def", "pushed": true, "pr_url": "http://forge/pr/1"
    }))
    .unwrap();
    s.set_result("t", None, &fin).unwrap();
    assert_eq!(s.resources("t").unwrap().len(), 2);
    s.clear_resources("t", None, "ok").unwrap();
    assert!(s.resources("t").unwrap().is_empty());
    let t = s.get("t").unwrap();
    assert_eq!(
        (t.vm_id.as_deref(), t.node.as_deref(), t.cleanup.as_deref()),
        (Some("vm1"), Some("node-a"), Some("ok"))
    );
    assert_eq!(t.image_digest.as_deref(), Some("sha256:ab"));
    assert_eq!(
        serde_json::to_value(t.result.unwrap()).unwrap(),
        serde_json::to_value(&fin).unwrap()
    );
    assert!(matches!(
        s.set_result("nope", None, &fin),
        Err(StoreError::NotFound(_))
    ));
    let mut n = NodeRecord {
        name: "b".into(),
        state: "up".into(),
        started_ms: 1,
        heartbeat_ms: 2,
        capacity: NodeCapacity::default(),
        usage: NodeUse::default(),
    };
    s.node_beat(&n).unwrap();
    n.name = "a".into();
    s.node_beat(&n).unwrap();
    n.started_ms = 3;
    let before = now_ms();
    s.node_beat(&n).unwrap();
    let nodes = s.nodes().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!((nodes[0].name.as_str(), nodes[0].started_ms), ("a", 3));
    // The heartbeat is the store's now, not what the node sent (2).
    assert!(nodes[0].heartbeat_ms + 1000 >= before, "{nodes:?}");
}

/// Eight threads race to claim the same queued tasks (half one by one,
/// half all in one [`Store::claim_many`]): each is claimed exactly once,
/// with epoch 1, and a claimed task is not claimed again.
pub fn a_task_is_claimed_once_among_racing_claimers(
    open: &(dyn Fn(&str) -> Box<dyn Store> + Sync),
) {
    let s: Arc<dyn Store> = open("claims").into();
    for i in 0..20 {
        s.insert(&format!("t{i:02}"), &req()).unwrap();
    }
    let racers = 8;
    let barrier = Barrier::new(racers);
    let won: Vec<Vec<String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..racers)
            .map(|r| {
                let barrier = &barrier;
                // Each racer with a store of its own, as nodes have.
                let mine = open("claims");
                sc.spawn(move || {
                    barrier.wait();
                    let mut won = vec![];
                    let node = format!("n{r}");
                    let ids = (0..20).map(|i| format!("t{i:02}"));
                    let got: Vec<TaskRecord> = if r % 2 == 0 {
                        ids.filter_map(|id| mine.claim(&id, &node, "vm", &[]).unwrap())
                            .collect()
                    } else {
                        let claims: Vec<Claim> = ids
                            .map(|id| Claim {
                                id,
                                vm_id: "vm".into(),
                                resources: vec![],
                            })
                            .collect();
                        mine.claim_many(&node, &claims).unwrap()
                    };
                    for t in got {
                        assert_eq!(t.state, State::Provisioning);
                        assert_eq!(t.node.as_deref(), Some(node.as_str()));
                        won.push(t.id);
                    }
                    won
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<String> = won.concat();
    all.sort();
    assert_eq!(all.len(), 20, "every task claimed once: {won:?}");
    all.dedup();
    assert_eq!(all.len(), 20, "no task claimed twice: {won:?}");
    for t in s.list(None, 100).unwrap() {
        assert_eq!((t.state, t.epoch), (State::Provisioning, 1), "{}", t.id);
        assert_eq!(t.transitions.len(), 2, "{}", t.id);
    }
    assert!(s.claim("t00", "again", "vm", &[]).unwrap().is_none());
    // Re-queued and claimed again: the epoch moves on.
    s.requeue("t00").unwrap();
    assert_eq!(s.claim("t00", "n9", "vm2", &[]).unwrap().unwrap().epoch, 2);
    assert!(s.claim("nope", "n", "vm", &[]).unwrap().is_none());
}

/// [`Store::claim_many`]: the tasks still queued are won, in the order
/// asked, each with its VM and resources on record; one another node has
/// is passed over; a drained node wins none.
pub fn claims_in_a_batch_keep_order_and_resources(s: &dyn Store) {
    for id in ["a", "b", "c", "d"] {
        s.insert(id, &req()).unwrap();
    }
    s.claim("b", "other", "vm-b", &[]).unwrap().unwrap();
    let ask = |id: &str| Claim {
        id: id.into(),
        vm_id: format!("vm-{id}"),
        resources: vec![
            ("vm".into(), format!("vm-{id}")),
            ("netns".into(), format!("/run/netns/{id}")),
        ],
    };
    let won = s.claim_many("n", &[ask("c"), ask("b"), ask("a")]).unwrap();
    assert_eq!(
        won.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["c", "a"]
    );
    for t in &won {
        assert_eq!((t.state, t.epoch), (State::Provisioning, 1), "{t:?}");
        assert_eq!(t.node.as_deref(), Some("n"));
        assert_eq!(t.vm_id.as_deref(), Some(format!("vm-{}", t.id).as_str()));
        assert_eq!(
            t.transitions.iter().map(|x| x.state).collect::<Vec<_>>(),
            [State::Queued, State::Provisioning]
        );
        assert_eq!(
            s.resources(&t.id).unwrap(),
            [
                ("vm".into(), format!("vm-{}", t.id)),
                ("netns".into(), format!("/run/netns/{}", t.id))
            ]
        );
    }
    assert_eq!(s.get("b").unwrap().node.as_deref(), Some("other"));
    assert!(s.resources("b").unwrap().is_empty());
    // A drained node wins nothing; the task stays queued.
    s.node_beat(&node("drained", "up", 1)).unwrap();
    s.drain_node("drained", true).unwrap();
    assert!(s.claim_many("drained", &[ask("d")]).unwrap().is_empty());
    assert_eq!(s.get("d").unwrap().state, State::Queued);
    assert!(s.claim_many("n", &[]).unwrap().is_empty());
}

/// [`Store::claim_next`]: `pick` is shown the queue's head in run order
/// (priority, then submission), at most `look` of it; what it answers is
/// claimed, and nothing else.
pub fn claim_next_offers_the_head_in_run_order(s: &dyn Store) {
    let urgent: TaskRequest =
        serde_json::from_str(r#"{"command": ["true"], "priority": 5}"#).unwrap();
    s.insert("a", &req()).unwrap();
    s.insert("b", &urgent).unwrap();
    s.insert("c", &req()).unwrap();
    let ask = |t: &TaskRecord| Claim {
        id: t.id.clone(),
        vm_id: format!("vm-{}", t.id),
        resources: vec![("vm".into(), format!("vm-{}", t.id))],
    };
    let mut seen = vec![];
    let won = s
        .claim_next("n", 2, &mut |q| {
            seen = q.iter().map(|t| t.id.clone()).collect();
            q.iter().take(1).map(ask).collect()
        })
        .unwrap();
    assert_eq!(seen, ["b", "a"]);
    assert_eq!(won.len(), 1);
    assert_eq!((won[0].id.as_str(), won[0].epoch), ("b", 1));
    assert_eq!(s.resources("b").unwrap(), [("vm".into(), "vm-b".into())]);
    assert_eq!(s.get("a").unwrap().state, State::Queued);
    let won = s
        .claim_next("n", 10, &mut |q| q.iter().map(ask).collect())
        .unwrap();
    assert_eq!(
        won.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert!(s
        .claim_next("n", 10, &mut |q| {
            assert!(q.is_empty(), "{q:?}");
            vec![]
        })
        .unwrap()
        .is_empty());
}

/// Writes under a claim that moved on fail and change nothing.
pub fn writes_under_an_old_claim_are_fenced(s: &dyn Store) {
    s.insert("t", &req()).unwrap();
    let t = s
        .claim("t", "a", "vm", &[("vm", "vm"), ("netns", "/run/netns/vm")])
        .unwrap()
        .unwrap();
    assert_eq!(t.epoch, 1);
    // The claim put its resources on record, in order.
    assert_eq!(
        s.resources("t").unwrap(),
        [
            ("vm".into(), "vm".into()),
            ("netns".into(), "/run/netns/vm".into())
        ]
    );
    assert_eq!(
        t.transitions.iter().map(|x| x.state).collect::<Vec<_>>(),
        [State::Queued, State::Provisioning]
    );
    let stale = Some(t.epoch + 1);
    assert!(matches!(
        s.transition("t", stale, State::Booting, None, None, None),
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        s.append_output("t", stale, 1, b"x", 100),
        Err(StoreError::Fenced { .. })
    ));
    let fin = crate::repo::Finalized::default();
    assert!(matches!(
        s.set_result("t", stale, &fin),
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        s.clear_resources("t", stale, "ok"),
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(s.resources("t").unwrap().len(), 2);
    assert!(matches!(
        s.set_image_digest("t", stale, "sha256:x"),
        Err(StoreError::Fenced { .. })
    ));
    let t = s.get("t").unwrap();
    assert_eq!(
        (t.state, t.output_bytes, t.result.is_none()),
        (State::Provisioning, 0, true)
    );
    // Under the current claim they go through; the record returned has
    // the whole history.
    let t = s
        .transition("t", Some(1), State::Booting, Some("why"), None, None)
        .unwrap();
    assert_eq!(
        t.transitions
            .iter()
            .map(|x| (x.state, x.reason.as_deref()))
            .collect::<Vec<_>>(),
        [
            (State::Queued, None),
            (State::Provisioning, None),
            (State::Booting, Some("why"))
        ]
    );
    assert_eq!(
        serde_json::to_value(&t).unwrap(),
        serde_json::to_value(s.get("t").unwrap()).unwrap()
    );
    assert!(s.append_output("t", Some(1), 1, b"x", 100).unwrap());
    s.set_result("t", Some(1), &fin).unwrap();
}

pub fn node(name: &str, state: &str, started_ms: u64) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        state: state.into(),
        started_ms,
        heartbeat_ms: 0,
        capacity: NodeCapacity::default(),
        usage: NodeUse::default(),
    }
}

/// A node silent past the timeout is declared dead by a peer: its booted
/// tasks fail node_lost, its claimed ones are queued again, all under a
/// new epoch; its old incarnation cannot beat again, a new one can.
pub fn a_silent_node_is_reaped_once_and_its_tasks_settled(s: &dyn Store) {
    assert!(s.node_beat(&node("a", "up", 1)).unwrap().is_some());
    assert!(s.node_beat(&node("b", "up", 1)).unwrap().is_some());
    assert!(s.node_beat(&node("s", "stopped", 1)).unwrap().is_some());
    for id in ["x", "y", "z", "w"] {
        s.insert(id, &req()).unwrap();
    }
    s.claim("x", "b", "vm-x", &[]).unwrap().unwrap();
    s.claim("y", "b", "vm-y", &[]).unwrap().unwrap();
    s.transition("y", Some(1), State::Booting, None, None, None)
        .unwrap();
    s.claim("z", "b", "vm-z", &[]).unwrap().unwrap();
    s.transition("z", Some(1), State::Booting, None, None, None)
        .unwrap();
    s.transition("z", Some(1), State::Running, None, None, None)
        .unwrap();
    s.claim("w", "a", "vm-w", &[]).unwrap().unwrap();
    // Cancels asked through another node reach the owner's list.
    s.request_cancel("w").unwrap();
    assert_eq!(s.cancel_requests("a").unwrap(), ["w"]);
    assert!(s.cancel_requests("b").unwrap().is_empty());
    assert!(matches!(
        s.request_cancel("nope"),
        Err(StoreError::NotFound(_))
    ));
    // Within the timeout: nobody is dead.
    assert!(s.reap_dead_nodes("a", 60_000).unwrap().is_empty());
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert!(s.node_beat(&node("a", "up", 1)).unwrap().is_some());
    let r = s.reap_dead_nodes("a", 10).unwrap();
    assert_eq!(
        r,
        [Reaped {
            node: "b".into(),
            failed: vec!["y".into(), "z".into()],
            requeued: vec!["x".into()],
        }]
    );
    // Once only.
    assert!(s.reap_dead_nodes("a", 10).unwrap().is_empty());
    let x = s.get("x").unwrap();
    assert_eq!(
        (x.state, x.epoch, x.node.as_deref()),
        (State::Queued, 2, None)
    );
    assert_eq!(
        x.transitions.last().unwrap().reason.as_deref(),
        Some("node_lost")
    );
    for id in ["y", "z"] {
        let t = s.get(id).unwrap();
        assert_eq!((t.state, t.epoch), (State::Failed, 2), "{id}");
        assert_eq!(t.reason.as_deref(), Some("node_lost"));
        assert!(
            t.detail.as_deref().unwrap().contains("node b"),
            "{:?}",
            t.detail
        );
    }
    assert_eq!(s.get("w").unwrap().state, State::Provisioning);
    // The dead node's late write is fenced; the task stays as the peer
    // left it.
    assert!(matches!(
        s.transition("z", Some(1), State::Succeeded, None, None, Some(0)),
        Err(StoreError::Fenced { .. })
    ));
    let states: Vec<(String, String)> = s
        .nodes()
        .unwrap()
        .into_iter()
        .map(|n| (n.name, n.state))
        .collect();
    assert_eq!(
        states,
        [
            ("a".into(), "up".into()),
            ("b".into(), "dead".into()),
            ("s".into(), "stopped".into())
        ]
    );
    // The dead incarnation cannot beat; a new one (a new start) can.
    assert!(s.node_beat(&node("b", "up", 1)).unwrap().is_none());
    assert_eq!(s.nodes().unwrap()[1].state, "dead");
    assert_eq!(
        s.node_beat(&node("b", "up", 2)).unwrap().as_deref(),
        Some("up")
    );
    assert_eq!(s.nodes().unwrap()[1].state, "up");
    // Drained, a node's `up` beats stay `draining`; taken back, `up`.
    assert!(s.drain_node("nope", true).unwrap().is_none());
    assert_eq!(s.drain_node("b", true).unwrap().unwrap().state, "draining");
    assert_eq!(
        s.node_beat(&node("b", "up", 2)).unwrap().as_deref(),
        Some("draining")
    );
    assert_eq!(s.nodes().unwrap()[1].state, "draining");
    // A stopped node is not drained.
    assert_eq!(s.drain_node("s", true).unwrap().unwrap().state, "stopped");
    assert_eq!(s.drain_node("b", false).unwrap().unwrap().state, "up");
    assert_eq!(
        s.node_beat(&node("b", "up", 2)).unwrap().as_deref(),
        Some("up")
    );
    // A drained or dead node claims nothing.
    s.insert("q", &req()).unwrap();
    s.drain_node("b", true).unwrap();
    assert!(s.claim("q", "b", "vm", &[]).unwrap().is_none());
    s.drain_node("b", false).unwrap();
    assert!(s.claim("q", "b", "vm", &[]).unwrap().is_some());
    // A drain ends with the incarnation (a restart comes back up).
    s.drain_node("b", true).unwrap();
    assert_eq!(
        s.node_beat(&node("b", "up", 3)).unwrap().as_deref(),
        Some("up")
    );
}
