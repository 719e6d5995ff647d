from services.infra_installer.app import SPEC
from shared.service import main

main(SPEC)
