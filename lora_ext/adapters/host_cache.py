"""Validated adapter weights kept in host memory, least recently used evicted first once their
bytes exceed the budget. An evicted adapter is read again from its files when next needed."""

from collections import OrderedDict


class HostCache:
    def __init__(self, max_bytes=None):
        self.max_bytes = max_bytes  # None: no limit
        self._entries = OrderedDict()  # name -> adapter weights (any object with .nbytes)
        self.bytes = 0

    def __contains__(self, name):
        return name in self._entries

    def names(self):
        return list(self._entries)

    def get(self, name):
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
        return entry

    def put(self, name, entry):
        """Adds an entry; returns the names evicted to stay within the budget (never `name` itself)."""
        self.remove(name)
        self._entries[name] = entry
        self.bytes += entry.nbytes
        evicted = []
        while self.max_bytes is not None and self.bytes > self.max_bytes and len(self._entries) > 1:
            old, _ = next(iter(self._entries.items()))
            self.remove(old)
            evicted.append(old)
        return evicted

    def remove(self, name):
        entry = self._entries.pop(name, None)
        if entry is not None:
            self.bytes -= entry.nbytes
        return entry
