"""``python -m lorafleet.cli``: the same as the ``lorafleet`` command."""

from lorafleet.cli import main

main()
