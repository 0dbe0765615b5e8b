//! The gateway's priority queue: four classes (0 urgent … 3 bulk). Urgent frames go
//! first, always; classes 1–3 share the rest by deficit round robin with byte quanta so
//! none starves. Each class is bounded in items and bytes: a push beyond the bound is
//! refused with `QUEUE_FULL` (backpressure) and an accepted item is never dropped.
//!
//! Frames live in one byte arena per class (appended at the tail, consumed at the head,
//! compacted in place), so a steady flow allocates nothing.

use std::collections::VecDeque;

use crate::error::{Code, Error, Result};

/// Number of priority classes.
pub const CLASSES: usize = 4;

/// Bounds and quanta of a [`PriorityQueue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Maximum items held per class.
    pub max_items: usize,
    /// Maximum frame bytes held per class.
    pub max_bytes: usize,
    /// Base quantum in bytes (≥ 1).
    pub quantum: usize,
    /// Quantum multipliers of classes 1, 2, 3 (control, telemetry, bulk).
    pub weights: [usize; 3],
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_items: 65536,
            max_bytes: 64 << 20,
            quantum: 4096,
            weights: [8, 4, 1],
        }
    }
}

/// What the gateway needs to persist or relay a frame without parsing it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub prio: u8,
    pub device: u64,
    pub msg_id: u64,
    pub action: u16,
    pub len: u32,
}

#[derive(Debug, Default)]
struct Class {
    metas: VecDeque<Meta>,
    arena: Vec<u8>,
    head: usize,
    deficit: usize,
}

impl Class {
    fn bytes(&self) -> usize {
        self.arena.len() - self.head
    }

    fn pop_into(&mut self, out: &mut Vec<u8>) -> Meta {
        let m = self.metas.pop_front().expect("class not empty");
        let end = self.head + m.len as usize;
        out.extend_from_slice(&self.arena[self.head..end]);
        self.head = end;
        if self.metas.is_empty() {
            self.arena.clear();
            self.head = 0;
        } else if self.head > 4096 && self.head * 2 > self.arena.len() {
            self.arena.copy_within(self.head.., 0);
            self.arena.truncate(self.arena.len() - self.head);
            self.head = 0;
        }
        m
    }
}

/// Frames popped by [`PriorityQueue::pop_batch`]: metadata plus one byte buffer holding
/// the frames back to back. Reuse it across calls (it is cleared, not freed).
#[derive(Debug, Default)]
pub struct Batch {
    pub items: Vec<Meta>,
    pub bytes: Vec<u8>,
}

impl Batch {
    pub fn clear(&mut self) {
        self.items.clear();
        self.bytes.clear();
    }

    /// The popped items with their frame bytes.
    pub fn iter(&self) -> impl Iterator<Item = (&Meta, &[u8])> {
        let mut at = 0;
        self.items.iter().map(move |m| {
            let f = &self.bytes[at..at + m.len as usize];
            at += m.len as usize;
            (m, f)
        })
    }
}

/// Four bounded classes served urgent-first, then by deficit round robin.
#[derive(Debug)]
pub struct PriorityQueue {
    cfg: QueueConfig,
    classes: [Class; CLASSES],
    /// The DRR class whose turn it is (1..=3).
    turn: usize,
    /// Whether `turn` has received its quantum for this turn.
    topped: bool,
    len: usize,
}

impl Default for PriorityQueue {
    fn default() -> Self {
        Self::new(QueueConfig::default())
    }
}

impl PriorityQueue {
    pub fn new(mut cfg: QueueConfig) -> Self {
        cfg.quantum = cfg.quantum.max(1);
        for w in &mut cfg.weights {
            *w = (*w).max(1);
        }
        Self {
            cfg,
            classes: Default::default(),
            turn: 1,
            topped: false,
            len: 0,
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Items held, all classes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items held in class `prio` (0 when out of range).
    pub fn len_class(&self, prio: usize) -> usize {
        self.classes.get(prio).map_or(0, |c| c.metas.len())
    }

    /// Frame bytes held in class `prio` (0 when out of range).
    pub fn bytes_class(&self, prio: usize) -> usize {
        self.classes.get(prio).map_or(0, Class::bytes)
    }

    /// Appends a frame to class `prio`; `QUEUE_FULL` when the class is at its bound
    /// (nothing is dropped), `BAD_PRIORITY` for a class above 3.
    pub fn push(
        &mut self,
        prio: u8,
        device: u64,
        msg_id: u64,
        action: u16,
        frame: &[u8],
    ) -> Result<()> {
        let cfg = self.cfg;
        let Some(c) = self.classes.get_mut(prio as usize) else {
            return Err(Error::new(
                Code::BadPriority,
                format!("priority class {prio} above 3"),
            ));
        };
        if c.metas.len() >= cfg.max_items || c.bytes() + frame.len() > cfg.max_bytes {
            return Err(Error::new(
                Code::QueueFull,
                format!(
                    "class {prio} holds {} items / {} bytes",
                    c.metas.len(),
                    c.bytes()
                ),
            ));
        }
        let len = u32::try_from(frame.len())
            .map_err(|_| Error::new(Code::Oversize, "frame above 4 GiB"))?;
        c.arena.extend_from_slice(frame);
        c.metas.push_back(Meta {
            prio,
            device,
            msg_id,
            action,
            len,
        });
        self.len += 1;
        Ok(())
    }

    fn quantum(&self, class: usize) -> usize {
        self.cfg.quantum.saturating_mul(self.cfg.weights[class - 1])
    }

    /// The class the next pop serves (advancing the round robin), if any.
    fn next_class(&mut self) -> Option<usize> {
        if !self.classes[0].metas.is_empty() {
            return Some(0);
        }
        if self.classes[1..].iter().all(|c| c.metas.is_empty()) {
            return None;
        }
        loop {
            let t = self.turn;
            let q = self.quantum(t);
            let c = &mut self.classes[t];
            if let Some(front) = c.metas.front() {
                if !self.topped {
                    c.deficit = c.deficit.saturating_add(q);
                    self.topped = true;
                }
                if front.len as usize <= c.deficit {
                    return Some(t);
                }
            } else {
                c.deficit = 0;
            }
            self.turn = if t == 3 { 1 } else { t + 1 };
            self.topped = false;
        }
    }

    /// Pops up to `max_items` frames holding at most `max_bytes` bytes in all (the first
    /// frame is always taken, so a frame above `max_bytes` cannot block the queue).
    /// Appends to `out` and returns the number of frames popped.
    pub fn pop_batch(&mut self, max_items: usize, max_bytes: usize, out: &mut Batch) -> usize {
        let mut taken = 0;
        let mut bytes = 0;
        while taken < max_items {
            let Some(t) = self.next_class() else { break };
            let c = &mut self.classes[t];
            let len = c.metas.front().expect("next_class has a frame").len as usize;
            if taken > 0 && bytes + len > max_bytes {
                break;
            }
            if t > 0 {
                c.deficit -= len;
            }
            let m = c.pop_into(&mut out.bytes);
            if t > 0 && c.metas.is_empty() {
                c.deficit = 0;
            }
            out.items.push(m);
            self.len -= 1;
            taken += 1;
            bytes += len;
        }
        taken
    }

    /// Pops one frame.
    pub fn pop(&mut self) -> Option<(Meta, Vec<u8>)> {
        let mut b = Batch::default();
        self.pop_batch(1, usize::MAX, &mut b);
        b.items.pop().map(|m| (m, b.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(max_items: usize, max_bytes: usize, quantum: usize) -> PriorityQueue {
        PriorityQueue::new(QueueConfig {
            max_items,
            max_bytes,
            quantum,
            weights: [8, 4, 1],
        })
    }

    #[test]
    fn urgent_first_then_fifo_per_class() {
        let mut pq = q(100, 1 << 20, 100);
        pq.push(3, 1, 1, 5, b"bulk").unwrap();
        pq.push(0, 1, 2, 85, b"urgent").unwrap();
        pq.push(0, 1, 3, 85, b"urgent2").unwrap();
        let (m, f) = pq.pop().unwrap();
        assert_eq!((m.msg_id, &f[..]), (2, &b"urgent"[..]));
        assert_eq!(pq.pop().unwrap().0.msg_id, 3);
        assert_eq!(pq.pop().unwrap().0.msg_id, 1);
        assert!(pq.pop().is_none());
        assert!(pq.is_empty());
    }

    #[test]
    fn bounds_give_backpressure_and_keep_items() {
        let mut pq = q(2, 10, 100);
        pq.push(2, 1, 1, 30, b"12345").unwrap();
        pq.push(2, 1, 2, 30, b"12345").unwrap();
        assert_eq!(
            pq.push(2, 1, 3, 30, b"1").unwrap_err().code,
            Code::QueueFull
        );
        pq.push(1, 1, 3, 30, b"1234567890").unwrap();
        assert_eq!(
            pq.push(1, 1, 4, 30, b"1").unwrap_err().code,
            Code::QueueFull
        );
        assert_eq!(
            pq.push(4, 1, 4, 30, b"1").unwrap_err().code,
            Code::BadPriority
        );
        assert_eq!((pq.len(), pq.len_class(2), pq.bytes_class(2)), (3, 2, 10));
    }

    #[test]
    fn drr_shares_bytes_by_weight_and_never_starves() {
        let mut pq = q(100_000, 1 << 30, 100);
        for i in 0..3000 {
            for p in 1..=3 {
                pq.push(p, 0, i, 1, &[0u8; 100]).unwrap();
            }
        }
        let mut b = Batch::default();
        pq.pop_batch(1300, usize::MAX, &mut b);
        let count = |p| b.items.iter().filter(|m| m.prio == p).count();
        assert_eq!((count(1), count(2), count(3)), (800, 400, 100));
        // FIFO inside a class
        let ids: Vec<_> = b
            .items
            .iter()
            .filter(|m| m.prio == 3)
            .map(|m| m.msg_id)
            .collect();
        assert_eq!(ids, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn batches_respect_the_byte_budget_and_arena_is_reused() {
        let mut pq = q(100, 1 << 20, 10);
        for i in 0..10 {
            pq.push(2, 9, i, 30, &[i as u8; 50]).unwrap();
        }
        let mut b = Batch::default();
        assert_eq!(pq.pop_batch(100, 120, &mut b), 2);
        assert_eq!(pq.pop_batch(100, 1, &mut b), 1);
        let frames: Vec<_> = b.iter().map(|(m, f)| (m.msg_id, f[0], f.len())).collect();
        assert_eq!(frames, vec![(0, 0, 50), (1, 1, 50), (2, 2, 50)]);
        assert_eq!(pq.bytes_class(2), 350);
        b.clear();
        assert_eq!(pq.pop_batch(100, usize::MAX, &mut b), 7);
        assert_eq!(pq.bytes_class(2), 0);
    }
}
