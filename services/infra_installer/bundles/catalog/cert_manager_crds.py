"""cert-manager's CustomResourceDefinitions (apiextensions.k8s.io/v1) with structural schemas.

The field layout follows cert-manager v1; the schemas are written here rather than vendored from
upstream so that they stay readable. Every node has a `type` (a structural schema), so the API server
prunes unknown fields. Deep provider-specific configuration (ACME solvers, Vault, Venafi, keystores)
is kept as `x-kubernetes-preserve-unknown-fields` objects: cert-manager's webhook validates those.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]
GROUP = "cert-manager.io"
ACME_GROUP = "acme.cert-manager.io"


# ---------------------------------------------------------------- schema helpers
def string(fmt: str | None = None, enum: list[str] | None = None) -> Schema:
    s: Schema = {"type": "string"}
    if fmt:
        s["format"] = fmt
    if enum:
        s["enum"] = enum
    return s


def integer(fmt: str = "int32") -> Schema:
    return {"type": "integer", "format": fmt}


def boolean() -> Schema:
    return {"type": "boolean"}


def array(items: Schema, list_type: str = "atomic") -> Schema:
    return {"type": "array", "items": items, "x-kubernetes-list-type": list_type}


def strings() -> Schema:
    return array(string())


def obj(properties: dict[str, Schema] | None = None, required: list[str] | None = None) -> Schema:
    s: Schema = {"type": "object"}
    if properties is not None:
        s["properties"] = properties
    if required:
        s["required"] = required
    return s


def free_form() -> Schema:
    """Provider-specific configuration: kept as given, validated by cert-manager's webhook."""
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def string_map() -> Schema:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def conditions(extra: dict[str, Schema] | None = None) -> Schema:
    item = obj({"type": string(), "status": string(enum=["True", "False", "Unknown"]), "reason": string(),
                "message": string(), "lastTransitionTime": string("date-time"),
                "observedGeneration": integer("int64"), **(extra or {})}, ["status", "type"])  # fmt: skip
    return {"type": "array", "items": item, "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


def issuer_ref() -> Schema:
    return obj({"name": string(), "kind": string(), "group": string()}, ["name"])


def secret_key_selector() -> Schema:
    return obj({"name": string(), "key": string()}, ["name"])


def root(spec: Schema, status: Schema, spec_required: bool = True) -> Schema:
    return obj({"apiVersion": string(), "kind": string(), "metadata": {"type": "object"}, "spec": spec,
                "status": status}, ["spec"] if spec_required else None)  # fmt: skip


USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
          "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
          "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
          "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]  # fmt: skip


# ---------------------------------------------------------------- schemas per kind
def certificate_schema() -> Schema:
    subject = obj({k: strings() for k in ("organizations", "countries", "organizationalUnits", "localities",
                                          "provinces", "streetAddresses", "postalCodes")} | {"serialNumber": string()})
    private_key = obj({"algorithm": string(enum=["RSA", "ECDSA", "Ed25519"]),
                       "encoding": string(enum=["PKCS1", "PKCS8"]), "size": integer(),
                       "rotationPolicy": string(enum=["Never", "Always"])})  # fmt: skip
    spec = obj({
        "secretName": string(), "issuerRef": issuer_ref(), "commonName": string(), "literalSubject": string(),
        "dnsNames": strings(), "ipAddresses": strings(), "uris": strings(), "emailAddresses": strings(),
        "duration": string(), "renewBefore": string(), "renewBeforePercentage": integer(), "isCA": boolean(),
        "usages": array(string(enum=USAGES)), "subject": subject, "privateKey": private_key,
        "secretTemplate": obj({"annotations": string_map(), "labels": string_map()}),
        "revisionHistoryLimit": integer(), "encodeUsagesInRequest": boolean(),
        "additionalOutputFormats": array(obj({"type": string(enum=["DER", "CombinedPEM"])}, ["type"])),
        "keystores": free_form(), "nameConstraints": free_form(), "otherNames": array(free_form()),
    }, ["issuerRef", "secretName"])  # fmt: skip
    status = obj({"conditions": conditions(), "notBefore": string("date-time"), "notAfter": string("date-time"),
                  "renewalTime": string("date-time"), "revision": integer(), "lastFailureTime": string("date-time"),
                  "failedIssuanceAttempts": integer(), "nextPrivateKeySecretName": string()})  # fmt: skip
    return root(spec, status)


def certificate_request_schema() -> Schema:
    spec = obj({
        "request": string("byte"), "issuerRef": issuer_ref(), "duration": string(), "isCA": boolean(),
        "usages": array(string(enum=USAGES)), "username": string(), "uid": string(), "groups": strings(),
        "extra": {"type": "object", "additionalProperties": strings()},
    }, ["issuerRef", "request"])  # fmt: skip
    status = obj({"conditions": conditions(), "certificate": string("byte"), "ca": string("byte"),
                  "failureTime": string("date-time")})  # fmt: skip
    return root(spec, status)


def issuer_schema() -> Schema:
    acme = obj({
        "email": string(), "server": string(), "privateKeySecretRef": secret_key_selector(),
        "skipTLSVerify": boolean(), "preferredChain": string(), "caBundle": string("byte"),
        "disableAccountKeyGeneration": boolean(), "enableDurationFeature": boolean(), "profile": string(),
        "externalAccountBinding": free_form(), "solvers": array(free_form()),
    }, ["privateKeySecretRef", "server"])  # fmt: skip
    spec = obj({
        "acme": acme,
        "ca": obj({"secretName": string(), "crlDistributionPoints": strings(), "ocspServers": strings(),
                   "issuingCertificateURLs": strings()}, ["secretName"]),
        "selfSigned": obj({"crlDistributionPoints": strings()}),
        "vault": free_form(),
        "venafi": free_form(),
    })  # fmt: skip
    status = obj({"conditions": conditions(), "acme": obj({"uri": string(), "lastRegisteredEmail": string(),
                                                           "lastPrivateKeyHash": string()})})  # fmt: skip
    return root(spec, status)


def order_schema() -> Schema:
    spec = obj({"request": string("byte"), "issuerRef": issuer_ref(), "commonName": string(), "dnsNames": strings(),
                "ipAddresses": strings(), "duration": string(), "profile": string()},
               ["issuerRef", "request"])  # fmt: skip
    states = ["valid", "ready", "pending", "processing", "invalid", "expired", "errored"]
    status = obj({"url": string(), "finalizeURL": string(), "certificate": string("byte"),
                  "state": string(enum=states), "reason": string(), "failureTime": string("date-time"),
                  "authorizations": array(free_form())})  # fmt: skip
    return root(spec, status)


def challenge_schema() -> Schema:
    required = ["authorizationURL", "dnsName", "issuerRef", "key", "solver", "token", "type", "url"]
    spec = obj({"url": string(), "authorizationURL": string(), "dnsName": string(), "wildcard": boolean(),
                "type": string(enum=["HTTP-01", "DNS-01"]), "token": string(), "key": string(),
                "solver": free_form(), "issuerRef": issuer_ref()}, required)  # fmt: skip
    states = ["valid", "ready", "pending", "processing", "invalid", "expired", "errored"]
    status = obj({"processing": boolean(), "presented": boolean(), "reason": string(),
                  "state": string(enum=states)})  # fmt: skip
    return root(spec, status)


# ---------------------------------------------------------------- the CRDs
def _ready_column() -> dict[str, Any]:
    return {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}


def _age_column() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def crd(group: str, kind: str, plural: str, scope: str, schema: Schema, short_names: list[str],
        columns: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "labels": {"app.kubernetes.io/name": "cert-manager"}},
        "spec": {
            "group": group,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": short_names, "categories": ["cert-manager"]},
            "scope": scope,
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
            }],
        },
    }  # fmt: skip


def crds() -> list[dict[str, Any]]:
    ready, age = _ready_column(), _age_column()
    issuer_col = {"name": "Issuer", "type": "string", "jsonPath": ".spec.issuerRef.name"}
    state_col = {"name": "State", "type": "string", "jsonPath": ".status.state"}
    return [
        crd(GROUP, "Certificate", "certificates", "Namespaced", certificate_schema(), ["cert", "certs"],
            [ready, {"name": "Secret", "type": "string", "jsonPath": ".spec.secretName"}, issuer_col, age]),
        crd(GROUP, "CertificateRequest", "certificaterequests", "Namespaced", certificate_request_schema(),
            ["cr", "crs"], [ready, issuer_col, age]),
        crd(GROUP, "Issuer", "issuers", "Namespaced", issuer_schema(), [], [ready, age]),
        crd(GROUP, "ClusterIssuer", "clusterissuers", "Cluster", issuer_schema(), [], [ready, age]),
        crd(ACME_GROUP, "Order", "orders", "Namespaced", order_schema(), [], [state_col, issuer_col, age]),
        crd(ACME_GROUP, "Challenge", "challenges", "Namespaced", challenge_schema(), [],
            [state_col, {"name": "Domain", "type": "string", "jsonPath": ".spec.dnsName"}, age]),
    ]  # fmt: skip
