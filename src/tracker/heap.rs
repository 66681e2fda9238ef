//! The deadline heap: a binary min-heap of close times per bot; every move updates the key's `heap_pos`, so a key's
//! entry is found without a search.

use super::{HeapEntry, KeyState, Millis, UserSlot};

/// Heap order: close time, then user id string (unique within a bot's heap).
#[inline]
fn before(users: &[UserSlot], a: &HeapEntry, b: &HeapEntry) -> bool {
    if a.deadline != b.deadline {
        return a.deadline < b.deadline;
    }
    user_before(users, a, b)
}

/// The tie-break of [`before`]: equal close times are rare in session mode (millisecond times).
#[cold]
#[inline(never)]
fn user_before(users: &[UserSlot], a: &HeapEntry, b: &HeapEntry) -> bool {
    users[a.user as usize].name.as_deref() < users[b.user as usize].name.as_deref()
}

pub(super) fn sift_up(
    heap: &mut [HeapEntry],
    slots: &mut [KeyState],
    users: &[UserSlot],
    mut i: usize,
) {
    let e = heap[i];
    while i > 0 {
        let parent = (i - 1) / 2;
        if !before(users, &e, &heap[parent]) {
            break;
        }
        heap[i] = heap[parent];
        slots[heap[i].slot as usize].heap_pos = i as u32;
        i = parent;
    }
    heap[i] = e;
    slots[e.slot as usize].heap_pos = i as u32;
}

pub(super) fn sift_down(
    heap: &mut [HeapEntry],
    slots: &mut [KeyState],
    users: &[UserSlot],
    mut i: usize,
) {
    let e = heap[i];
    loop {
        let left = 2 * i + 1;
        if left >= heap.len() {
            break;
        }
        let right = left + 1;
        let child = if right < heap.len() && before(users, &heap[right], &heap[left]) {
            right
        } else {
            left
        };
        if !before(users, &heap[child], &e) {
            break;
        }
        heap[i] = heap[child];
        slots[heap[i].slot as usize].heap_pos = i as u32;
        i = child;
    }
    heap[i] = e;
    slots[e.slot as usize].heap_pos = i as u32;
}

/// Sets the close time of the entry at `i` and restores the heap order.
pub(super) fn heap_update(
    heap: &mut [HeapEntry],
    slots: &mut [KeyState],
    users: &[UserSlot],
    i: usize,
    deadline: Millis,
) {
    let old = std::mem::replace(&mut heap[i].deadline, deadline);
    if deadline < old {
        sift_up(heap, slots, users, i);
    } else if deadline > old {
        sift_down(heap, slots, users, i);
    }
}

/// Removes the least entry.
pub(super) fn heap_pop(heap: &mut Vec<HeapEntry>, slots: &mut [KeyState], users: &[UserSlot]) {
    let last = heap.pop().expect("non-empty heap");
    if !heap.is_empty() {
        heap[0] = last;
        sift_down(heap, slots, users, 0);
    }
}
