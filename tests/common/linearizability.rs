//! A Wing–Gong style linearizability checker for per-key register histories
//! (put, get, compare-and-swap, delete), with memoised search as in
//! porcupine.
//!
//! Rules (RELIABILITY.md): every written value is unique; an operation that
//! timed out or failed is indeterminate (`ret: None`: it may take effect at
//! any time after its call, or never); failed reads are dropped by the
//! recorder. A history is checked per key against a register that starts
//! absent.

use rand::Rng;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

/// What an operation did, with what it observed when it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A put of a value.
    Put(Vec<u8>),
    /// A delete and, when it returned, whether the key existed.
    Delete { existed: Option<bool> },
    /// A read and what it returned.
    Get(Option<Vec<u8>>),
    /// A compare-and-swap and, when it returned, whether it succeeded and
    /// the value it found.
    Cas {
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
        outcome: Option<(bool, Option<Vec<u8>>)>,
    },
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub key: Vec<u8>,
    pub kind: Kind,
    /// Call time (any monotonic unit).
    pub call: u64,
    /// Return time; `None` when indeterminate.
    pub ret: Option<u64>,
}

type State = Option<Vec<u8>>;

/// Applies `op` to `state` if the outcome it reported is possible there;
/// `None` when it is not.
fn step(state: &State, op: &Op) -> Option<State> {
    let determinate = op.ret.is_some();
    match &op.kind {
        Kind::Put(v) => Some(Some(v.clone())),
        Kind::Delete { existed } => match (determinate, existed) {
            (true, Some(e)) => (*e == state.is_some()).then_some(None),
            _ => Some(None),
        },
        Kind::Get(seen) => (!determinate || seen == state).then(|| state.clone()),
        Kind::Cas {
            expected,
            new,
            outcome,
        } => {
            let matches = expected == state;
            let after = if matches { new.clone() } else { state.clone() };
            match (determinate, outcome) {
                // It saw the value it reports, and succeeded exactly when
                // that was the expected one.
                (true, Some((ok, current))) => {
                    (current == state && *ok == matches).then_some(after)
                }
                _ => Some(after),
            }
        }
    }
}

/// States one key's search may visit before it gives up (see
/// [`check_key`]).
pub const SEARCH_BUDGET: usize = 4_000_000;

/// Whether the operations on one key are linearizable: `Some(true)` or
/// `Some(false)`, or `None` when the search visited more than
/// [`SEARCH_BUDGET`] states without deciding (many indeterminate operations
/// overlapping: the caller treats that as a failure to show).
///
/// # Panics
/// With more than 128 operations (the search keeps a bit per operation).
pub fn check_key(ops: &[Op]) -> Option<bool> {
    assert!(ops.len() <= 128, "at most 128 operations per key");
    let ops = &canonical(ops);
    // Indeterminate operations of the same kind are interchangeable: the
    // search takes them in call order only (one that could go next with
    // an earlier-called twin unused could swap places with it), which
    // turns 2^n subsets of n twins into n + 1 counts.
    let mut twin_before: Vec<Option<usize>> = vec![None; ops.len()];
    let mut by_call: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].ret.is_none()).collect();
    by_call.sort_by_key(|&i| (ops[i].call, i));
    for (n, &i) in by_call.iter().enumerate() {
        twin_before[i] = by_call[..n]
            .iter()
            .rev()
            .find(|&&j| ops[j].kind == ops[i].kind)
            .copied();
    }
    // Indeterminate operations may take effect at the very end (after every
    // other operation, they change nothing anyone saw): the search is done
    // once every determinate one is placed.
    let determinate: u128 = (0..ops.len())
        .filter(|&i| ops[i].ret.is_some())
        .fold(0, |m, i| m | (1 << i));
    let mut seen: HashSet<(u128, State)> = HashSet::new();
    // Depth-first search over "which operation takes effect next".
    let mut stack: Vec<(u128, State)> = vec![(0, None)];
    while let Some((done, state)) = stack.pop() {
        if done & determinate == determinate {
            return Some(true);
        }
        if !seen.insert((done, state.clone())) {
            continue;
        }
        if seen.len() > SEARCH_BUDGET {
            return None;
        }
        // An operation may go next only if no pending one returned before
        // it was called.
        let min_ret = (0..ops.len())
            .filter(|i| done & (1 << i) == 0)
            .map(|i| ops[i].ret.unwrap_or(u64::MAX))
            .min()
            .unwrap_or(u64::MAX);
        for (i, op) in ops.iter().enumerate() {
            if done & (1 << i) != 0 || op.call > min_ret {
                continue;
            }
            if twin_before[i].is_some_and(|j| done & (1 << j) == 0) {
                continue;
            }
            if let Some(next) = step(&state, op) {
                stack.push((done | (1 << i), next));
            }
        }
    }
    Some(false)
}

/// `ops` with every written value that no operation observes (no read
/// returned it, no CAS expected or reported it) replaced by one stand-in.
/// The checker cannot tell such values apart (each only makes the key
/// exist), so this changes no verdict and merges the search's states.
fn canonical(ops: &[Op]) -> Vec<Op> {
    let mut observed: HashSet<&[u8]> = HashSet::new();
    for op in ops {
        match &op.kind {
            Kind::Get(Some(v)) => {
                observed.insert(v);
            }
            Kind::Cas {
                expected, outcome, ..
            } => {
                observed.extend(expected.as_deref());
                if let Some((_, Some(current))) = outcome {
                    observed.insert(current);
                }
            }
            _ => {}
        }
    }
    let mut stand_in = b"\0unobserved".to_vec();
    while observed.contains(stand_in.as_slice()) {
        stand_in.push(0);
    }
    let map = |v: &Vec<u8>| {
        if observed.contains(v.as_slice()) {
            v.clone()
        } else {
            stand_in.clone()
        }
    };
    ops.iter()
        .map(|op| {
            let kind = match &op.kind {
                Kind::Put(v) => Kind::Put(map(v)),
                Kind::Cas {
                    expected,
                    new,
                    outcome,
                } => Kind::Cas {
                    expected: expected.clone(),
                    new: new.as_ref().map(map),
                    outcome: outcome.clone(),
                },
                other => other.clone(),
            };
            Op { kind, ..op.clone() }
        })
        .collect()
}

/// Checks every key of a history; returns the keys that are not
/// linearizable.
pub fn check(ops: &[Op]) -> Vec<Vec<u8>> {
    let mut by_key: BTreeMap<&[u8], Vec<Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    by_key
        .into_iter()
        .filter(|(k, ops)| match check_key(ops) {
            Some(ok) => !ok,
            None => {
                eprintln!("{k:?}: undecided after {SEARCH_BUDGET} states (counted as failed)");
                true
            }
        })
        .map(|(k, _)| k.to_vec())
        .collect()
}

/// Prints the histories of `bad` keys in call order (times in ms since the
/// recorder started), each with the `events` (time, what) that overlap it.
pub fn report(ops: &[Op], bad: &[Vec<u8>], events: &[(u64, String)]) {
    let ms = |t: u64| t as f64 / 1e6;
    for k in bad {
        let mut h: Vec<&Op> = ops.iter().filter(|o| &o.key == k).collect();
        h.sort_by_key(|o| o.call);
        eprintln!("history of {k:?}:");
        for o in &h {
            eprintln!(
                "  {:?} call {:.1} ret {:?}",
                o.kind,
                ms(o.call),
                o.ret.map(ms)
            );
        }
        let from = h.first().map_or(0, |o| o.call);
        let to = h
            .iter()
            .map(|o| o.ret.unwrap_or(u64::MAX))
            .max()
            .unwrap_or(0);
        let mut before = None;
        for (t, what) in events {
            if *t < from {
                before = Some((t, what));
                continue;
            }
            if let Some((bt, bw)) = before.take() {
                eprintln!("  event {:.1} {bw}", ms(*bt));
            }
            if *t <= to {
                eprintln!("  event {:.1} {what}", ms(*t));
            }
        }
    }
}

/// Records a history from concurrent clients with one clock.
pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    /// Client errors seen, by kind.
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            errors: Mutex::new(Default::default()),
        }
    }
}

impl Recorder {
    /// Now, in nanoseconds since the recorder started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Adds a finished (or indeterminate) operation.
    pub fn push(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    /// Counts a client error by its kind (a timeout, or the refusal's
    /// reason).
    pub fn error(&self, e: &tessera::client::ClientError) {
        use tessera::client::ClientError;
        let head = |s: String| -> String {
            s.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let kind = match e {
            ClientError::Timeout { .. } => "timeout".to_string(),
            ClientError::Refused(a) => format!("refused: {}", head(format!("{a:?}"))),
            other => head(format!("{other:?}")),
        };
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }

    /// Client errors seen so far, by kind.
    #[allow(dead_code)] // not every test that records prints them
    pub fn errors(&self) -> std::collections::BTreeMap<String, u64> {
        self.errors.lock().unwrap().clone()
    }

    /// The history so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }
}

/// Recorded client calls: each pushes its operation with the time it was
/// called and, when it returned, the time it returned (failed or timed-out
/// writes are indeterminate; failed reads are dropped).
impl Recorder {
    /// A put; whether it was acknowledged.
    pub async fn put(&self, cl: &tessera::Client, key: &[u8], value: Vec<u8>) -> bool {
        let call = self.now();
        let r = cl.put(key, &value).await;
        if let Err(e) = &r {
            self.error(e);
        }
        self.push(Op {
            key: key.to_vec(),
            kind: Kind::Put(value),
            call,
            ret: r.is_ok().then(|| self.now()),
        });
        r.is_ok()
    }

    /// A read; what it returned.
    pub async fn get(&self, cl: &tessera::Client, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let call = self.now();
        let r = cl.get(key).await.map_err(|e| self.error(&e)).ok()?;
        self.push(Op {
            key: key.to_vec(),
            kind: Kind::Get(r.clone()),
            call,
            ret: Some(self.now()),
        });
        Some(r)
    }

    /// A delete, checked against whether the key existed.
    pub async fn delete(&self, cl: &tessera::Client, key: &[u8]) {
        let call = self.now();
        let r = cl.delete(key).await;
        if let Err(e) = &r {
            self.error(e);
        }
        self.push(Op {
            key: key.to_vec(),
            kind: Kind::Delete {
                existed: r.as_ref().ok().copied(),
            },
            call,
            ret: r.is_ok().then(|| self.now()),
        });
    }

    /// A CAS from `expected` to `new`; the key's value after it.
    pub async fn cas(
        &self,
        cl: &tessera::Client,
        key: &[u8],
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Option<Option<Vec<u8>>> {
        let call = self.now();
        let r = cl.cas(key, expected.as_deref(), Some(&new)).await;
        if let Err(e) = &r {
            self.error(e);
        }
        let outcome = r.as_ref().ok().map(|o| (o.succeeded, o.current.clone()));
        let after = outcome.as_ref().map(|(ok, current)| match ok {
            true => Some(new.clone()),
            false => current.clone(),
        });
        self.push(Op {
            key: key.to_vec(),
            kind: Kind::Cas {
                expected,
                new: Some(new),
                outcome,
            },
            call,
            ret: r.is_ok().then(|| self.now()),
        });
        after
    }

    /// One operation of the mixed workload on `key`: put, get, delete or
    /// CAS (expecting what this client last saw of the key, in `seen`, so
    /// both outcomes happen), writing the unique value `unique`.
    pub async fn random_op(
        &self,
        cl: &tessera::Client,
        key: &[u8],
        unique: Vec<u8>,
        seen: &mut HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) {
        let choice = rand::thread_rng().gen_range(0..4);
        let after = match choice {
            0 => self
                .put(cl, key, unique.clone())
                .await
                .then_some(Some(unique)),
            1 => self.get(cl, key).await,
            2 => {
                self.delete(cl, key).await;
                None
            }
            _ => {
                let expected = seen.get(key).cloned().flatten();
                self.cas(cl, key, expected, unique).await
            }
        };
        if let Some(v) = after {
            seen.insert(key.to_vec(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(v: &str, call: u64, ret: Option<u64>) -> Op {
        Op {
            key: b"k".to_vec(),
            kind: Kind::Put(v.as_bytes().to_vec()),
            call,
            ret,
        }
    }

    fn get(v: Option<&str>, call: u64, ret: u64) -> Op {
        Op {
            key: b"k".to_vec(),
            kind: Kind::Get(v.map(|s| s.as_bytes().to_vec())),
            call,
            ret: Some(ret),
        }
    }

    fn bytes(v: Option<&str>) -> Option<Vec<u8>> {
        v.map(|s| s.as_bytes().to_vec())
    }

    /// A CAS; `seen` is what a returned one reports as the current value.
    fn cas(exp: Option<&str>, new: &str, ok: Option<bool>, call: u64, ret: Option<u64>) -> Op {
        let seen = match ok {
            Some(true) => exp,
            _ => None,
        };
        cas_seen(exp, new, ok.map(|ok| (ok, seen)), call, ret)
    }

    fn cas_seen(
        exp: Option<&str>,
        new: &str,
        outcome: Option<(bool, Option<&str>)>,
        call: u64,
        ret: Option<u64>,
    ) -> Op {
        Op {
            key: b"k".to_vec(),
            kind: Kind::Cas {
                expected: bytes(exp),
                new: Some(new.as_bytes().to_vec()),
                outcome: outcome.map(|(ok, seen)| (ok, bytes(seen))),
            },
            call,
            ret,
        }
    }

    fn delete(existed: Option<bool>, call: u64, ret: Option<u64>) -> Op {
        Op {
            key: b"k".to_vec(),
            kind: Kind::Delete { existed },
            call,
            ret,
        }
    }

    #[test]
    fn good_histories_pass() {
        // Sequential.
        assert_eq!(
            check_key(&[put("a", 0, Some(1)), get(Some("a"), 2, 3)]),
            Some(true)
        );
        // A read overlapping a write may see either value.
        assert_eq!(
            check_key(&[
                put("a", 0, Some(1)),
                put("b", 2, Some(6)),
                get(Some("a"), 3, 4)
            ]),
            Some(true)
        );
        assert_eq!(
            check_key(&[
                put("a", 0, Some(1)),
                put("b", 2, Some(6)),
                get(Some("b"), 3, 4)
            ]),
            Some(true)
        );
        // An indeterminate write may take effect later...
        assert_eq!(
            check_key(&[put("a", 0, None), get(None, 1, 2), get(Some("a"), 3, 4)]),
            Some(true)
        );
        // ...or never.
        assert_eq!(
            check_key(&[put("a", 0, None), get(None, 10, 11)]),
            Some(true)
        );
        // CAS chain.
        assert_eq!(
            check_key(&[
                cas(None, "a", Some(true), 0, Some(1)),
                cas_seen(None, "b", Some((false, Some("a"))), 2, Some(3)),
                cas(Some("a"), "c", Some(true), 4, Some(5)),
                get(Some("c"), 6, 7),
            ]),
            Some(true)
        );
        // Deletes report whether the key existed.
        assert_eq!(
            check_key(&[
                delete(Some(false), 0, Some(1)),
                put("a", 2, Some(3)),
                delete(Some(true), 4, Some(5)),
                get(None, 6, 7),
            ]),
            Some(true)
        );
        // The empty history.
        assert_eq!(check_key(&[]), Some(true));
    }

    /// A fault leaves many writes in flight at once (the soak's 3 s
    /// deadline): the search stays small and still decides.
    #[test]
    fn many_indeterminate_writes_are_decided() {
        let mut h = vec![put("a", 0, Some(1))];
        for i in 0..14u64 {
            h.push(put(&format!("lost{i}"), 2 + i, None));
        }
        for i in 0..5u64 {
            h.push(cas(None, &format!("c{i}"), None, 3 + i, None));
        }
        for i in 0..4u64 {
            h.push(delete(None, 4 + i, None));
        }
        // Later: some of them landed (the key exists, then is deleted).
        h.push(delete(Some(true), 100, Some(101)));
        h.push(get(None, 102, 103));
        h.push(put("b", 104, Some(105)));
        h.push(delete(Some(true), 106, Some(107)));
        h.push(delete(Some(true), 108, Some(109)));
        assert_eq!(check_key(&h), Some(true));
        // And a stale read among them is still caught.
        h.push(get(Some("a"), 110, 111));
        assert_eq!(check_key(&h), Some(false));
    }

    /// A soak's history (times in 0.1 ms) with 15 writes left in flight by
    /// a failing disk: the search without twins ran out of its budget.
    #[test]
    fn a_soak_history_with_many_writes_in_flight_is_linearizable() {
        let h = vec![
            cas_seen(None, "w2-1368", Some((true, None)), 899688, Some(899893)),
            put("w4-1431", 899757, Some(899985)),
            get(Some("w4-1431"), 900056, 900315),
            delete(Some(true), 900125, Some(900386)),
            delete(Some(false), 900601, Some(900719)),
            delete(Some(false), 901086, Some(901252)),
            get(None, 901745, 901991),
            delete(Some(false), 901747, Some(901991)),
            get(None, 901878, 902049),
            delete(Some(false), 902100, Some(902410)),
            delete(Some(false), 902103, Some(902479)),
            put("w6-1354", 902323, None),
            cas_seen(None, "w1-1411", None, 902325, None),
            cas_seen(Some("w4-1431"), "w4-1444", None, 902765, None),
            put("w2-1384", 902896, None),
            cas_seen(None, "w7-1426", None, 903203, None),
            put("w3-1525", 903842, None),
            cas_seen(None, "w5-1377", None, 903890, None),
            cas_seen(None, "w0-1330", None, 904070, None),
            delete(None, 932783, None),
            put("w7-1429", 933131, None),
            cas_seen(Some("w4-1431"), "w4-1451", None, 933861, None),
            delete(None, 934343, None),
            cas_seen(None, "w3-1537", None, 934455, None),
            put("w6-1368", 934712, None),
            put("w0-1339", 935354, None),
            get(Some("w3-1538"), 961452, 966451),
            cas_seen(
                None,
                "w0-1351",
                Some((false, Some("w3-1538"))),
                962996,
                Some(966446),
            ),
            put("w7-1430", 964935, Some(967773)),
            delete(Some(true), 965597, Some(968433)),
            put("w3-1538", 965704, Some(966222)),
            delete(Some(true), 965956, Some(966510)),
            get(None, 966644, 966768),
            put("w6-1372", 966705, Some(966924)),
            delete(Some(true), 967184, Some(967294)),
            get(None, 967187, 967298),
            get(Some("w7-1430"), 967555, 967776),
            get(Some("w7-1430"), 967588, 967779),
            get(None, 6557932, 6558016),
        ];
        assert_eq!(check_key(&h), Some(true));
    }

    #[test]
    fn bad_histories_fail() {
        // A stale read after a completed write.
        assert_eq!(
            check_key(&[
                put("a", 0, Some(1)),
                put("b", 2, Some(3)),
                get(Some("a"), 4, 5)
            ]),
            Some(false)
        );
        // A lost write: the acknowledged value never shows, the old one does.
        assert_eq!(
            check_key(&[put("a", 0, Some(1)), get(None, 2, 3)]),
            Some(false)
        );
        // Reads that go back in time.
        assert_eq!(
            check_key(&[
                put("a", 0, Some(1)),
                put("b", 2, Some(10)),
                get(Some("b"), 3, 4),
                get(Some("a"), 5, 6),
            ]),
            Some(false)
        );
        // Two successful CAS from the same expected value.
        assert_eq!(
            check_key(&[
                cas(None, "a", Some(true), 0, Some(1)),
                cas(None, "b", Some(true), 2, Some(3)),
            ]),
            Some(false)
        );
        // A failed CAS that saw its own new value: the signature of a
        // write applied twice (the retry of a CAS whose reply was lost).
        assert_eq!(
            check_key(&[cas_seen(None, "a", Some((false, Some("a"))), 0, Some(1))]),
            Some(false)
        );
        // A failed CAS reporting a value other than the current one.
        assert_eq!(
            check_key(&[
                put("a", 0, Some(1)),
                cas_seen(Some("b"), "c", Some((false, Some("b"))), 2, Some(3)),
            ]),
            Some(false)
        );
        // A delete that found a key no one wrote, and one that missed a
        // key that was there.
        assert_eq!(check_key(&[delete(Some(true), 0, Some(1))]), Some(false));
        assert_eq!(
            check_key(&[put("a", 0, Some(1)), delete(Some(false), 2, Some(3))]),
            Some(false)
        );
        // A phantom value nobody wrote.
        assert_eq!(check_key(&[get(Some("z"), 0, 1)]), Some(false));
        let mut h = vec![put("a", 0, Some(1))];
        h.push(Op {
            key: b"other".to_vec(),
            ..get(Some("a"), 2, 3)
        });
        assert_eq!(check(&h), vec![b"other".to_vec()]);
    }
}
