from capcurate.cli import main

main()
