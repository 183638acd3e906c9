from services.execution.server import main

main()
