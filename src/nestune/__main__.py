from nestune.cli import main

main()
