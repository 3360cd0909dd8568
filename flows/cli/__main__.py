"""`python -m arborl.flows.cli`: the `arborl` command."""

from arborl.flows.cli import main

main()
