from mvd_deploy.cli import main

main()
