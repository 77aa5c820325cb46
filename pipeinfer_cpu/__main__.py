from pipeinfer_cpu.app.cli import main

main()
