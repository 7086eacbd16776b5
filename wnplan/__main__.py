from wnplan.cli import main

main()
