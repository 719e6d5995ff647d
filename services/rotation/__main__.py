from services.rotation.app import SPEC
from shared.service import main

main(SPEC)
