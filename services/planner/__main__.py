from services.planner.app import SPEC
from shared.service import main

main(SPEC)
