from streamgpen.cli import main

main()
