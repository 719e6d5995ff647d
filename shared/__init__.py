"""Flotilla's common code: event contracts, bus runtime, state store, settings."""
