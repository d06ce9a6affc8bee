from mtnlg_cli.cli import main

main()
