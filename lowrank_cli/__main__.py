from lowrank_cli.cli import main

main()
