//! The seam on a toy part (no KVM): conformance, refusals, PartSet order.

use castor_parts::{
    decode_section, encode_section, part_conformance, Checked, Part, PartDescriptor, PartError,
    PartId, PartIdentity, PartKind, PartSet, Staged, VersionRange,
};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CounterV1 {
    value: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CounterV2 {
    value: u64,
    label: String,
}

struct Counter {
    id: PartId,
    state: Mutex<CounterV2>,
    log: Arc<Mutex<Vec<PartId>>>,
}

struct StagedCounter(PartId, CounterV2);

impl Staged for StagedCounter {
    fn version(&self) -> u16 {
        2
    }
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), PartError> {
        encode_section(self.0, &self.1, out)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("label {0:?} is too long")]
struct LabelTooLong(String);

impl Part for Counter {
    fn descriptor(&self) -> PartDescriptor {
        PartDescriptor {
            id: self.id,
            identity: PartIdentity::Output,
            versions: VersionRange::new(1, 2),
        }
    }
    fn stage(&self) -> Result<Box<dyn Staged>, PartError> {
        Ok(Box::new(StagedCounter(
            self.id,
            self.state.lock().unwrap().clone(),
        )))
    }
    fn check(&self, version: u16, data: &[u8]) -> Result<Checked, PartError> {
        let s = match version {
            1 => {
                let v1: CounterV1 = decode_section(self.id, 1, data)?;
                CounterV2 {
                    value: v1.value,
                    label: String::new(),
                }
            }
            2 => decode_section(self.id, 2, data)?,
            _ => {
                return Err(PartError::UnsupportedVersion {
                    id: self.id,
                    version,
                    accepted: self.versions(),
                })
            }
        };
        if s.label.len() > 16 {
            return Err(PartError::Invalid {
                id: self.id,
                source: Box::new(LabelTooLong(s.label)),
            });
        }
        Ok(Checked::new(self.id, version, s))
    }
    fn restore(&self, state: &Checked) -> Result<(), PartError> {
        let s: &CounterV2 = state.get(self.id)?;
        *self.state.lock().unwrap() = s.clone();
        self.log.lock().unwrap().push(self.id);
        Ok(())
    }
}

fn counter(instance: u32, value: u64, label: &str) -> Arc<Counter> {
    Arc::new(Counter {
        id: PartId::new(PartKind::Output, instance),
        state: Mutex::new(CounterV2 {
            value,
            label: label.into(),
        }),
        log: Arc::new(Mutex::new(Vec::new())),
    })
}

part_conformance!(counter_conforms, || (
    counter(0, 41, "hello"),
    counter(0, 0, "")
));

#[test]
fn previous_version_is_read() {
    let id = PartId::new(PartKind::Output, 0);
    let mut v1 = Vec::new();
    encode_section(id, &CounterV1 { value: 9 }, &mut v1).unwrap();
    let dst = counter(0, 0, "x");
    let c = dst.check(1, &v1).unwrap();
    dst.restore(&c).unwrap();
    assert_eq!(dst.state.lock().unwrap().value, 9);
}

#[test]
fn invalid_state_is_refused_before_it_becomes_live() {
    let src = counter(0, 1, "a label far longer than sixteen bytes");
    let dst = counter(0, 5, "keep");
    let staged = src.stage().unwrap();
    let mut bytes = Vec::new();
    staged.encode(&mut bytes).unwrap();
    let err = dst.check(2, &bytes).unwrap_err();
    assert!(matches!(err, PartError::Invalid { .. }), "{err}");
    assert_eq!(dst.state.lock().unwrap().value, 5, "nothing applied");
}

#[test]
fn restore_refuses_another_parts_state() {
    let a = counter(0, 1, "");
    let b = counter(1, 2, "");
    let staged = a.stage().unwrap();
    let mut bytes = Vec::new();
    staged.encode(&mut bytes).unwrap();
    let checked = a.check(2, &bytes).unwrap();
    assert!(matches!(
        b.restore(&checked),
        Err(PartError::WrongState { .. })
    ));
}

#[test]
fn garbage_never_panics() {
    let dst = counter(0, 0, "");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..512 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for v in 0..4 {
            let _ = dst.check(v, &bytes);
        }
    }
    // A length prefix claiming 4 GiB of label does not allocate it.
    let mut huge = vec![7u8];
    huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(dst.check(2, &huge).is_err());
}

#[test]
fn set_keeps_restore_order_and_refuses_duplicates() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mk = |i: u32| {
        Arc::new(Counter {
            id: PartId::new(PartKind::Vcpu, i),
            state: Mutex::new(CounterV2 {
                value: i as u64,
                label: String::new(),
            }),
            log: log.clone(),
        })
    };
    let mut set = PartSet::new();
    for i in [2, 0, 1] {
        assert!(set.push(mk(i)));
    }
    assert!(!set.push(mk(0)), "duplicate id refused");
    let states: Vec<Checked> = set
        .iter()
        .map(|p| {
            let s = p.stage().unwrap();
            let mut b = Vec::new();
            s.encode(&mut b).unwrap();
            p.check(2, &b).unwrap()
        })
        .collect();
    set.restore_all(&states).unwrap();
    let order: Vec<u32> = log.lock().unwrap().iter().map(|id| id.instance).collect();
    assert_eq!(order, [2, 0, 1]);
    assert_eq!(set.position(PartId::new(PartKind::Vcpu, 1)), Some(2));
}
