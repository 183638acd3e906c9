from services.generation.server import main

main()
