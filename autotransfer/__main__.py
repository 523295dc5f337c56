from autotransfer.cli import main

main()
