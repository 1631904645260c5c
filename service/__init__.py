"""The kvstore daemon and its client. Built by the service issue; empty until then."""
