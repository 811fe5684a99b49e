"""Harnesses for the test suite and the benchmarks: a private PostgreSQL (:mod:`.pgtest`), a real server on
loopback, bulk seeding and headless Chromium (:mod:`.harness`). Nothing in the product imports them."""
