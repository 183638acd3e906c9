from services.refinement.server import main

main()
