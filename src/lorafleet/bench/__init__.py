"""Experiments that answer a question with a table and plots (``lorafleet bench ...``): they drive training,
evaluation, the registry and the serving engine, so they live above all of them."""
