"""Storage tiers: the roles in ``base`` (memory tiers hold tensors, blob tiers self-describing
bytes), the kinds by name in ``registry``, one module per tier.

Nothing is imported here: ``kvstore.config`` reads the registry, and the tier modules import the
config, so this package must stay importable before either.
"""
