from services.cloud_provisioner.app import SPEC
from shared.service import main

if __name__ == "__main__":
    main(SPEC)
