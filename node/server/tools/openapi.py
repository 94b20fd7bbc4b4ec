# Writes src/http/openapi.json (the OpenAPI document served at /api/openapi.json):
#   python3 node/server/tools/openapi.py > node/server/src/http/openapi.json
# Edit this, not the JSON; src/http/openapi.rs tests that it lists exactly the routes.
import json
S = lambda name: {"$ref": f"#/components/schemas/{name}"}
def obj(props, required=None, extra=False):
    o = {"type": "object", "properties": props}
    o["required"] = required if required is not None else list(props)
    if not extra: o["additionalProperties"] = False
    return o
str_ = {"type": "string"}
int_ = {"type": "integer", "format": "int64"}
nint = {"type": ["integer", "null"], "format": "int64"}
nstr = {"type": ["string", "null"]}
smap = {"type": "object", "additionalProperties": {"type": "string"}}
attr_name = "^[A-Za-z0-9_.:-]{1,128}$"
identity = {"type": "object", "propertyNames": {"pattern": attr_name}, "additionalProperties": {"type": "string", "maxLength": 1024}, "maxProperties": 32}
cond = {"type": "string", "minLength": 1, "maxLength": 1024, "description": "a shoal-fleet filter: device_type=acme-board and region in (eu,us) and ram_mb >= 512"}
conds = {"type": "array", "items": cond, "maxItems": 32}
hex64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
hex32 = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
schemas = {
 "Error": obj({"error": str_, "code": {"type": "string", "enum": ["unauthorized","forbidden","not_found","conflict","bad_request","too_large","refused","unsupported_media_type","method_not_allowed","unavailable","internal"]}}),
 "Nonce": obj({"nonce": str_, "expires_in_s": int_}),
 "AuthRequest": obj({"identity": {**identity, "minProperties": 1}, "public_key": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}, "nonce": str_}),
 "AuthToken": obj({"token": str_, "device_id": hex64, "expires_in_s": int_}),
 "ReleaseRef": obj({"id": hex64, "name": str_, "version": str_}),
 "NextDeployment": obj({"id": hex32, "name": str_, "status": str_, "release": S("ReleaseRef"), "manifest_url": str_, "chunks_url": str_, "chunk_base_url": nstr}),
 "ChunkBatch": obj({"ids": {"type": "array", "items": hex64, "minItems": 1, "maxItems": 4096},
   "base": {**hex64, "description": "optional (daemons from before per-base encodings omit it): the manifest hash of the release the device runs, its running slot holding that release's payload from offset 0. When the deployment's release has per-base encodings against it, the answer is application/vnd.shoal.chunks.v2."}}, ["ids"]),
 "EncodeRequest": obj({"base": {**hex64, "description": "the base release's id (one devices run)"}}),
 "Encoding": obj({"base": hex64, "base_name": nstr, "base_version": nstr, "state": {"type": "string", "enum": ["queued", "running", "done", "failed"]}, "origin": {"type": "string", "enum": ["auto", "operator"], "description": "auto: queued by the server when the release was uploaded or deployed to devices running the base"}, "devices": {**int_, "description": "devices on the base when it was queued"}, "attempts": int_, "error": {**nstr, "description": "the last failure"}, "chunks": {**nint, "description": "distinct chunks of the release the base lacks (when done)"}, "chunks_delta": {**nint, "description": "of those, the ones stored delta-encoded"}, "plain_bytes": {**nint, "description": "their plain stored bytes"}, "encoded_bytes": {**nint, "description": "what a device on the base downloads for them"}, "saving": {"type": ["number", "null"], "description": "1 - encoded_bytes / plain_bytes"}, "created_ms": int_, "updated_ms": int_}),
 "EncodeReport": obj({"release": hex64, "base": hex64, "chunks": {**int_, "description": "distinct chunks of the release the base lacks"}, "chunks_delta": {**int_, "description": "of those, the ones stored delta-encoded (where that is smaller)"}, "plain_bytes": {**int_, "description": "their plain stored bytes"}, "encoded_bytes": {**int_, "description": "what a device on the base downloads for them: records where there is one, plain chunks elsewhere"}}),
 "StatusReport": obj({"status": {"type": "string", "enum": ["downloading","installing","rebooting","success","failure","already-installed"]}, "substate": {"type": ["string","null"], "maxLength": 256}}, ["status"]),
 "LogLine": obj({"timestamp_ms": int_, "level": {"type": "string", "enum": ["error","warn","info","debug","trace"]}, "message": str_}),
 "LogUpload": obj({"messages": {"type": "array", "items": S("LogLine"), "maxItems": 1000}}),
 "SignedReport": obj({"report": {"type": "string", "maxLength": 4096, "description": "a shoal_fleet::report::Report as JSON text, exactly as signed: {device_id, seq, at_ms, origin, deployment, release: {name, version}, status, substate}"}, "signature": {"type": "string", "pattern": "^[0-9a-fA-F]{128}$", "description": "ed25519 signature by the device's key of 'shoal status report v1\\0' followed by the report text"}}),
 "ReportDelivery": obj({"device_id": hex64, "reports": {"type": "array", "items": S("SignedReport"), "minItems": 1, "maxItems": 100}}),
 "ReportsDelivered": obj({"stored": {"type": "array", "items": int_}, "duplicates": {"type": "array", "items": int_}}),
 "StoredReport": obj({"seq": int_, "at_ms": nint, "received_ms": int_, "relayed_by": nstr, "origin": {"type": "string", "enum": ["standalone","daemon"]}, "deployment_id": nstr, "release_name": nstr, "release_version": nstr, "status": str_, "substate": nstr}),
 "Attribute": obj({"name": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}, "value": {"type": "string", "maxLength": 1024}}),
 "Attributes": {"type": "array", "items": S("Attribute"), "maxItems": 256},
 "Device": obj({"id": hex64, "public_key": str_, "identity": smap, "status": {"type": "string", "enum": ["pending","accepted","rejected","preauthorized"]}, "created_ms": int_, "updated_ms": int_, "last_seen_ms": nint, "inventory": smap}),
 "Preauthorize": obj({"identity": identity, "public_key": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}),
 "Group": obj({"name": str_, "kind": {"type": "string", "enum": ["static","dynamic"]}, "devices": {"type": "array", "items": str_}, "filter": {"type": "array", "items": str_}, "created_ms": int_}, ["name","kind","created_ms"]),
 "PutGroup": {"oneOf": [obj({"devices": {"type": "array", "items": str_}}), obj({"filter": conds})]},
 "Release": obj({"id": hex64, "name": str_, "version": str_, "device_types": {"type": "array", "items": str_}, "payload_bytes": int_, "stored_bytes": int_, "chunks": int_, "created_ms": int_}),
 "DeltaRow": obj({"installed_name": nstr, "installed_version": nstr, "known": {"type": "boolean"}, "devices": int_, "chunks": int_, "bytes": int_}),
 "Delta": obj({"release": S("Release"), "installed": {"type": "array", "items": S("DeltaRow")}}),
 "NewDeployment": {"oneOf": [obj({"name": {"type": "string", "minLength": 1, "maxLength": 256}, "release": hex64, "policy": S("Policy"), k: v}, ["name", "release", k]) for k, v in [("devices", {"type": "array", "items": str_, "minItems": 1}), ("group", {"type": "string", "pattern": attr_name}), ("filter", conds)]]},
 "Deployment": obj({"id": hex32, "name": str_, "release_id": str_, "target": {"type": "object"}, "status": {"type": "string", "enum": ["running","paused","halted","aborted","finished"]}, "halt_reason": nstr, "rollout": {"type": "object", "description": "policy and summary (phases, counts, what the next phase waits for) of the shoal_fleet rollout"}, "created_ms": int_, "created_by": str_, "finished_ms": nint, "stats": {"type": "object", "additionalProperties": int_}}),
 "DeviceState": obj({"device_id": str_, "status": {"type": "string", "enum": ["pending","downloading","installing","rebooting","success","failure","already-installed","noartifact","aborted"]}, "phase": int_, "substate": nstr, "attempts": int_, "updated_ms": int_, "finished_ms": nint}),
 "Threshold": {"oneOf": [obj({"count": {"type": "integer", "minimum": 0}}), obj({"percent": {"type": "integer", "minimum": 0, "maximum": 100}})]},
 "Policy": obj({"phases": {"type": "array", "minItems": 1, "maxItems": 64, "items": obj({"size": {"oneOf": [obj({"count": {"type": "integer", "minimum": 1}}), obj({"percent": {"type": "integer", "minimum": 1, "maximum": 100}}), {"type": "string", "enum": ["rest"]}]}, "proceed": obj({"successes": {"oneOf": [S("Threshold"), {"type": "null"}]}, "delay_ms": {"type": ["integer", "null"], "minimum": 1}}, [])}, ["size"])}, "failures_max": {"oneOf": [S("Threshold"), {"type": "null"}]}, "retries": {"type": "integer", "minimum": 0}, "seed": {"type": "integer", "minimum": 0}}, ["phases"]),
 "Token": obj({"id": str_, "name": str_, "role": {"type": "string", "enum": ["viewer","operator","admin"]}, "created_ms": int_, "revoked_ms": nint}),
 "NewToken": obj({"id": str_, "name": str_, "role": {"type": "string", "enum": ["viewer","operator","admin"]}, "created_ms": int_, "revoked_ms": nint, "secret": str_}),
 "CreateToken": obj({"name": {"type": "string", "minLength": 1, "maxLength": 128}, "role": {"type": "string", "enum": ["viewer","operator","admin"]}}),
 "AuditEntry": obj({"id": int_, "at_ms": int_, "actor": str_, "action": str_, "object": str_, "details": {}}),
}
def err(*codes):
    return {str(c): {"description": {400:"malformed request",401:"not authenticated",403:"not allowed",404:"not found",405:"method not allowed",409:"conflicts with the current state",413:"too large",415:"wrong content type",422:"refused content",500:"server error",503:"database unavailable"}[c], "content": {"application/json": {"schema": S("Error")}}} for c in codes}
def js(schema, desc="ok"):
    return {"description": desc, "content": {"application/json": {"schema": schema}}}
def body(schema, required=True):
    return {"required": required, "content": {"application/json": {"schema": schema}}}
def pp(*names):
    pats = {"name": attr_name}
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string", **({"pattern": pats[n]} if n in pats else {})}} for n in names]
dev = [{"deviceToken": []}]
api = [{"apiToken": []}]
E_JSON = (400, 413, 415, 422)
paths = {}
def op(method, path, summary, responses, security=None, params=(), request=None, tags=None, errors=()):
    o = {"summary": summary, "responses": {**responses, **err(*errors)}}
    if security is not None: o["security"] = security
    if params: o["parameters"] = list(params)
    if request: o["requestBody"] = request
    if tags: o["tags"] = tags
    paths.setdefault(path, {})[method.lower()] = o
D = "/api/devices/v1"; M = "/api/management/v1"
op("GET", "/api/openapi.json", "This document", {"200": js({"type": "object"})}, security=[], tags=["meta"])
op("GET", D+"/authentication/nonce", "A single-use nonce for the next auth request (valid 60 s)", {"200": js(S("Nonce"))}, security=[], tags=["device"], errors=(500,503))
op("POST", D+"/authentication/auth_requests", "Authenticate: body signed with the device key (hex ed25519 signature of the exact body in X-Shoal-Signature). Unknown devices become pending (401); accepted or preauthorized ones get a token.",
   {"200": js(S("AuthToken"))}, security=[], tags=["device"],
   params=[{"name": "X-Shoal-Signature", "in": "header", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{128}$"}}],
   request=body(S("AuthRequest")), errors=(400, 401, 413, 500, 503))
op("GET", D+"/deployments/next", "The oldest unfinished active deployment for this device, or 204", {"200": js(S("NextDeployment")), "204": {"description": "nothing to do"}}, security=dev, tags=["device"], errors=(401,500,503))
op("GET", D+"/deployments/{id}/manifest", "The release's signed manifest envelope (canonical CBOR); verify it against the device's trust root. A device naming the manifests it keeps (held) gets, when this server holds one of them too and that is smaller, a manifest delta instead (application/vnd.shoal.manifest-delta.v1): canonical CBOR {base: BLAKE3 of the base manifest's CBOR (32 bytes), frame: a zstd frame of the new manifest's CBOR with the base manifest's bytes as raw prefix, content size in its header, no dictionary id, signatures: the envelope's}. The device rebuilds the manifest against the base it keeps and verifies the signatures over the rebuilt bytes; without held (daemons from before), the envelope.",
   {"200": {"description": "the envelope, or a manifest delta against a held manifest", "content": {"application/vnd.shoal.envelope": {"schema": {"type": "string", "format": "binary"}}, "application/vnd.shoal.manifest-delta.v1": {"schema": {"type": "string", "format": "binary"}}}}}, security=dev, tags=["device"],
   params=[*pp("id"), {"name": "held", "in": "query", "required": False, "style": "form", "explode": False, "description": "the manifest hashes of the releases the device keeps (its running release's first), comma-separated", "schema": {"type": "array", "items": hex64, "maxItems": 4, "uniqueItems": True}}], errors=(400,401,403,404,409,500,503))
op("POST", D+"/deployments/{id}/chunks", "Stored chunks of the deployment's release: for each id in order, 32-byte id, big-endian u32 length, stored bytes (application/vnd.shoal.chunks, version 1). When the request names the device's base release and the deployment's release has per-base encodings against it, version 2 (application/vnd.shoal.chunks.v2): for each id in order, 32-byte id, one kind byte (0 plain, 1 delta), big-endian u32 length, then the plain stored bytes or a delta record: \"shd1\", a range count (1..=4), each range's big-endian u64 offset and u32 length in the base payload (at most 2 MiB in all), the BLAKE3 of those bytes, then a zstd frame compressed with them as a raw prefix. The device reads the ranges from its running slot, checks their hash, decodes, and checks the chunk's id. At most 4096 ids and 64 MiB.", {"200": {"description": "the framed chunks", "content": {"application/vnd.shoal.chunks": {"schema": {"type": "string", "format": "binary"}}, "application/vnd.shoal.chunks.v2": {"schema": {"type": "string", "format": "binary"}}}}}, security=dev, tags=["device"], params=pp("id"), request=body(S("ChunkBatch")), errors=(400,401,403,404,409,413,415,422,500,503))
op("PUT", D+"/deployments/{id}/status", "Report this device's state (Mender's names); 409 once aborted or finished otherwise", {"204": {"description": "recorded"}}, security=dev, tags=["device"], params=pp("id"), request=body(S("StatusReport")), errors=(400,401,403,404,409,413,415,422,500,503))
op("PUT", D+"/deployments/{id}/log", "Append this device's log lines for a deployment", {"204": {"description": "recorded"}}, security=dev, tags=["device"], params=pp("id"), request=body(S("LogUpload")), errors=(400,401,403,404,413,415,422,500,503))
op("GET", D+"/dictionaries/{zstd_id}", "A zstd dictionary chunks may be compressed with (id as 8 hex digits)", {"200": {"description": "the dictionary", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}, security=dev, tags=["device"], params=pp("zstd_id"), errors=(401,404,500,503))
op("PUT", D+"/inventory/attributes", "Replace this device's inventory (release_name, release_version and device_type are read by the server)", {"204": {"description": "stored"}}, security=dev, tags=["device"], request=body(S("Attributes")), errors=(400,401,413,415,422,500,503))
op("PATCH", D+"/inventory/attributes", "Add or update inventory attributes", {"204": {"description": "stored"}}, security=dev, tags=["device"], request=body(S("Attributes")), errors=(400,401,413,415,422,500,503))
op("POST", D+"/reports", "Deliver one device's signed status reports (its own, or another device's relayed by this one), queued while offline, with the time each happened. Idempotent on (device_id, seq); all or nothing: 403 device not accepted, 404 unknown device, 409 a seq stored with other content, 422 a signature that does not verify with the device's key", {"200": js(S("ReportsDelivered"))}, security=dev, tags=["device"], request=body(S("ReportDelivery")), errors=(400,401,403,404,409,413,415,422,500,503))
listq = [{"name": "status", "in": "query", "required": False, "schema": {"type": "string", "enum": ["pending","accepted","rejected","preauthorized"]}},
         {"name": "filter", "in": "query", "required": False, "style": "form", "explode": True, "description": "inventory filters (shoal-fleet syntax), all must hold", "schema": {"type": "array", "items": cond, "maxItems": 32}},
         {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
         {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}]
A = ["management"]
op("GET", M+"/devices", "List devices (viewer)", {"200": js({"type": "array", "items": S("Device")})}, security=api, tags=A, params=listq, errors=(400,401,403,500,503))
op("POST", M+"/devices", "Preauthorize a device key (operator)", {"201": js(S("Device"))}, security=api, tags=A, request=body(S("Preauthorize")), errors=(400,401,403,409,413,415,422,500,503))
op("GET", M+"/devices/{id}", "One device (viewer)", {"200": js(S("Device"))}, security=api, tags=A, params=pp("id"), errors=(401,403,404,500,503))
op("DELETE", M+"/devices/{id}", "Decommission a device (operator)", {"204": {"description": "decommissioned"}}, security=api, tags=A, params=pp("id"), errors=(401,403,404,500,503))
op("POST", M+"/devices/{id}/accept", "Accept a device (operator)", {"200": js(S("Device"))}, security=api, tags=A, params=pp("id"), errors=(401,403,404,409,500,503))
op("POST", M+"/devices/{id}/reject", "Reject a device and revoke its tokens (operator)", {"200": js(S("Device"))}, security=api, tags=A, params=pp("id"), errors=(401,403,404,409,500,503))
op("GET", M+"/devices/{id}/reports", "A device's signed status reports by seq, with the device's times (viewer)", {"200": js({"type": "array", "items": S("StoredReport")})}, security=api, tags=A, params=[*pp("id"), {"name": "after", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}, {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}], errors=(400,401,403,404,500,503))
op("GET", M+"/groups", "List groups (viewer)", {"200": js({"type": "array", "items": S("Group")})}, security=api, tags=A, errors=(401,403,500,503))
op("GET", M+"/groups/{name}", "One group (viewer)", {"200": js(S("Group"))}, security=api, tags=A, params=pp("name"), errors=(400,401,403,404,500,503))
op("PUT", M+"/groups/{name}", "Create or replace a static (devices) or dynamic (filter) group (operator)", {"200": js(S("Group"))}, security=api, tags=A, params=pp("name"), request=body(S("PutGroup")), errors=(400,401,403,404,409,413,415,422,500,503))
op("DELETE", M+"/groups/{name}", "Delete a group (operator)", {"204": {"description": "deleted"}}, security=api, tags=A, params=pp("name"), errors=(400,401,403,404,500,503))
op("GET", M+"/groups/{name}/devices", "The group's devices now (viewer)", {"200": js({"type": "array", "items": S("Device")})}, security=api, tags=A, params=pp("name"), errors=(400,401,403,404,500,503))
op("GET", M+"/releases", "List releases (viewer)", {"200": js({"type": "array", "items": S("Release")})}, security=api, tags=A, errors=(401,403,500,503))
op("POST", M+"/releases", "Upload a .shoal artifact, verified against the server's trust root as it streams in (operator)", {"200": js(S("Release"), "already there"), "201": js(S("Release"), "added")}, security=api, tags=A,
   request={"required": True, "content": {"application/vnd.shoal.artifact": {"schema": {"type": "string", "format": "binary"}}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, errors=(401,403,409,413,422,500,503))
op("GET", M+"/releases/{id}", "One release (viewer)", {"200": js(S("Release"))}, security=api, tags=A, params=pp("id"), errors=(401,403,404,500,503))
op("DELETE", M+"/releases/{id}", "Delete a release, refused while an active or paused deployment uses it (operator)", {"204": {"description": "deleted"}}, security=api, tags=A, params=pp("id"), errors=(401,403,404,409,500,503))
op("POST", M+"/releases/{id}/encodings", "Per-base encodings: delta-encode the release's chunks the base lacks against the base's bytes (the same reference rules as a thin artifact built with --base-image) and store them beside the plain chunks (deltas/<base>/...); devices running the base then download those where they are smaller. Computed now, one encoding at a time per server; asking again keeps the stored records (operator)", {"200": js(S("EncodeReport"))}, security=api, tags=A, params=pp("id"), request=body(S("EncodeRequest")), errors=(400,401,403,404,413,415,422,500,503))
op("GET", M+"/releases/{id}/encodings", "The release's per-base encodings: each base's state (queued, running, done, failed), origin (auto or operator), figures and saving, the bases most devices run first (viewer)", {"200": js({"type": "array", "items": S("Encoding")})}, security=api, tags=A, params=pp("id"), errors=(401,403,404,500,503))
op("GET", M+"/releases/{id}/delta", "Bytes devices on each installed release must download for this one (viewer)", {"200": js(S("Delta"))}, security=api, tags=A, params=pp("id"), errors=(401,403,404,500,503))
op("GET", M+"/deployments", "List deployments, newest first (viewer)", {"200": js({"type": "array", "items": S("Deployment")})}, security=api, tags=A, errors=(401,403,500,503))
op("POST", M+"/deployments", "Deploy a release to devices, a group or a filter (operator)", {"201": js(S("Deployment"))}, security=api, tags=A, request=body(S("NewDeployment")), errors=(400,401,403,404,409,413,415,422,500,503))
op("GET", M+"/deployments/{id}", "One deployment with counts per device state (viewer)", {"200": js(S("Deployment"))}, security=api, tags=A, params=pp("id"), errors=(401,403,404,500,503))
op("GET", M+"/deployments/{id}/devices", "Each device's state (viewer)", {"200": js({"type": "array", "items": S("DeviceState")})}, security=api, tags=A, params=pp("id"), errors=(401,403,404,500,503))
op("GET", M+"/deployments/{id}/devices/{device_id}/log", "A device's log for a deployment (viewer)", {"200": js({"type": "array", "items": S("LogLine")})}, security=api, tags=A, params=pp("id","device_id"), errors=(401,403,404,500,503))
for verb, what, frm in [("abort","Abort: unfinished devices end as aborted","running, paused or halted"),("retry","Failed devices go back to pending","not aborted and some failed"),("pause","Pause: no device starts, no phase opens","running"),("resume","Resume a paused or halted deployment","paused or halted"),("next_phase","Open the next rollout phase now","running with a phase left")]:
    op("POST", M+"/deployments/{id}/"+verb, f"{what} (operator; 409 unless {frm})", {"200": js(S("Deployment"))}, security=api, tags=A, params=pp("id"), errors=(401,403,404,409,500,503))
op("GET", M+"/tokens", "List API tokens (admin)", {"200": js({"type": "array", "items": S("Token")})}, security=api, tags=A, errors=(401,403,500,503))
op("POST", M+"/tokens", "Make an API token; the secret is shown once (admin)", {"201": js(S("NewToken"))}, security=api, tags=A, request=body(S("CreateToken")), errors=(400,401,403,413,415,422,500,503))
op("DELETE", M+"/tokens/{id}", "Revoke an API token (admin)", {"204": {"description": "revoked"}}, security=api, tags=A, params=pp("id"), errors=(401,403,404,500,503))
op("GET", M+"/audit", "The audit log, newest first (admin)", {"200": js({"type": "array", "items": S("AuditEntry")})}, security=api, tags=A, params=[{"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}], errors=(400,401,403,500,503))
doc = {"openapi": "3.1.0",
  "info": {"title": "Shoal server", "version": "1", "description": "Device API (/api/devices/v1) and management API (/api/management/v1) of `shoal server`. Every error is a JSON body {error, code}."},
  "paths": paths,
  "components": {"schemas": schemas, "securitySchemes": {
     "deviceToken": {"type": "http", "scheme": "bearer", "description": "a device token from POST /api/devices/v1/authentication/auth_requests"},
     "apiToken": {"type": "http", "scheme": "bearer", "description": "an API token (roles viewer, operator, admin)"}}}}
print(json.dumps(doc, indent=1))
