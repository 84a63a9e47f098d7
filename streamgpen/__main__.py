from streamgpen.cli.app import main

main()
