"""Reading evd's JSON logs back (SPEC section 8): `evd logs summary` and
`evd logs show`.  Offline tools: they read files, never talk to a daemon."""
