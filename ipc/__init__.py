"""Everything that crosses a process boundary: local IPC, settings, payloads, store and broker."""
