"""The agent daemon: configuration, the gate, its ledger, the registry, the monitor, the audit trail."""
