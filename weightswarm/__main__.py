from weightswarm.cli import main

main()
