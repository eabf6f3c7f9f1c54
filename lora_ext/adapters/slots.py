"""Which adapter lives in which device slot.

Slots are reused least-recently-used first; a slot pinned by a running batch is never reused, so
eviction never touches weights that a batch in flight reads. Not thread-safe by itself: the
model wrapper calls it under its lock.
"""


class SlotTable:
    def __init__(self, num_slots):
        self.num_slots = num_slots
        self.owner = [None] * num_slots  # adapter name per slot
        self.pins = [0] * num_slots      # running batches using each slot
        self.last_use = [0] * num_slots
        self._clock = 0
        self._slot_of = {}

    def slot_of(self, name):
        return self._slot_of.get(name)

    def resident(self):
        return dict(self._slot_of)

    def touch(self, slot):
        self._clock += 1
        self.last_use[slot] = self._clock

    def available(self, exclude=()):
        """How many slots not in `exclude` could take an adapter now (free, or holding one that no
        running batch uses)."""
        exclude = set(exclude)
        return sum(1 for s in range(self.num_slots) if self.pins[s] == 0 and s not in exclude)

    def free_or_victim(self, exclude=()):
        """A free slot, else the least recently used unpinned slot not in `exclude`, else None."""
        candidates = [s for s in range(self.num_slots) if self.pins[s] == 0 and s not in exclude]
        free = [s for s in candidates if self.owner[s] is None]
        if free:
            return free[0]
        return min(candidates, key=lambda s: self.last_use[s], default=None)

    def assign(self, slot, name):
        """Gives `slot` to `name`; returns the adapter it held before (now evicted), if any."""
        assert self.pins[slot] == 0, "a pinned slot is never reassigned"
        evicted = self.owner[slot]
        if evicted is not None:
            del self._slot_of[evicted]
        self.owner[slot] = name
        self._slot_of[name] = slot
        self.touch(slot)
        return evicted

    def release(self, name):
        """Frees the slot of `name` (if resident and unpinned); returns the slot or None."""
        slot = self._slot_of.get(name)
        if slot is None:
            return None
        if self.pins[slot]:
            raise RuntimeError(f"adapter {name!r} is in use by a running batch")
        del self._slot_of[name]
        self.owner[slot] = None
        return slot

    def pin(self, slots):
        for slot in slots:
            self.pins[slot] += 1
            self.touch(slot)

    def unpin(self, slots):
        for slot in slots:
            self.pins[slot] -= 1
