#!/usr/bin/env python3
"""AWS IoT control-plane calls made with AWS's own boto3 `iot` client.

Points boto3 at an AWS IoT control-plane endpoint -- in this repo,
fake-iot-core's HTTP URL -- with dummy credentials, and runs the calls an
operator makes around fleet provisioning. Steps are subcommands so a test can
interleave them with a device provisioning itself:

  setup   --template NAME --out-dir DIR
          CreateThingType, CreateThingGroup, CreatePolicy,
          CreateProvisioningTemplate (a body that uses all three, enabled),
          DescribeProvisioningTemplate, UpdateProvisioningTemplate (disable,
          then enable, describing after each), CreateProvisioningClaim; the
          claim certificate and key are written to DIR.
  inspect --thing NAME --certificate-id ID
          DescribeThing, ListThingPrincipals, DescribeCertificate,
          UpdateCertificate to INACTIVE and back to ACTIVE.
  job     --thing NAME --job-id ID
          CreateJob targeting the thing, DescribeJobExecution.

Each prints one JSON line on stdout. A failed call, or a reply that
contradicts what was just done, prints the action and the object on stderr
and exits 1.

  control_plane.py --http http://127.0.0.1:PORT setup --template T --out-dir D
"""

import argparse
import datetime
import json
import os
import sys
import time

import boto3
import botocore
import botocore.config
import botocore.exceptions

PROG = "control_plane"
REGION = "us-east-1"
# The fake does not check signatures, but boto3 signs every request (SigV4),
# so it needs some credentials; these keep it away from any real ones.
DUMMY_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
DUMMY_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
# Required by CreateProvisioningTemplate; only stored by the fake.
PROVISIONING_ROLE_ARN = "arn:aws:iam::123456789012:role/fake-iot-core-provisioning"
# How long DescribeJobExecution may keep answering ResourceNotFound: on AWS
# the executions of a new job appear asynchronously.
JOB_EXECUTION_WAIT_S = 10.0


class StepError(Exception):
    """A call failed or answered something unexpected; names action and object."""


def iot_client(http_url):
    return boto3.client(
        "iot",
        endpoint_url=http_url,
        region_name=REGION,
        aws_access_key_id=DUMMY_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET,
        aws_session_token=None,
        config=botocore.config.Config(
            # One attempt: a retried request would hide a fake that fails.
            retries={"total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=30,
        ),
    )


def call(client, operation, target, **params):
    """client.<operation>(**params); failures name the operation and target."""
    method = getattr(client, botocore.xform_name(operation))
    try:
        response = method(**params)
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = ": ".join(x for x in (err.get("Code"), err.get("Message")) if x)
        raise StepError(f"{operation} {target} failed: {detail or 'error'} "
                        f"(HTTP {status})") from e
    except botocore.exceptions.BotoCoreError as e:
        raise StepError(f"{operation} {target} failed: {e}") from e
    response.pop("ResponseMetadata", None)
    return response


def expect(condition, action, target, message):
    if not condition:
        raise StepError(f"{action} {target}: {message}")


def jsonable(value):
    """boto3 replies hold datetimes; print them as ISO 8601."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def write_file(path, text, private=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------


def device_policy_document():
    """What a provisioned device may do: connect as its thing name and use
    its own topics (the usual AWS IoT device policy)."""
    arn = f"arn:aws:iot:{REGION}:*"
    thing = "${iot:Connection.Thing.ThingName}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect",
             "Resource": f"{arn}:client/{thing}"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": [f"{arn}:topic/$aws/things/{thing}/*",
                          f"{arn}:topic/device/{thing}/*"]},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": [f"{arn}:topicfilter/$aws/things/{thing}/*",
                          f"{arn}:topicfilter/device/{thing}/*"]},
        ],
    }


def template_body(thing_prefix, thing_type, thing_group, policy):
    """A fleet provisioning template in the shape of AWS's documentation
    example: the device passes SerialNumber; the thing is named
    <prefix><SerialNumber>, typed, grouped, and gets the policy."""
    return {
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"},
        },
        "Resources": {
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {
                    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                    "Status": "Active",
                },
            },
            "policy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {"PolicyName": policy},
            },
            "thing": {
                "Type": "AWS::IoT::Thing",
                "OverrideSettings": {
                    "AttributePayload": "MERGE",
                    "ThingTypeName": "REPLACE",
                    "ThingGroups": "DO_NOTHING",
                },
                "Properties": {
                    "ThingName": {"Fn::Join": ["", [thing_prefix, {"Ref": "SerialNumber"}]]},
                    "AttributePayload": {"serial": {"Ref": "SerialNumber"}},
                    "ThingTypeName": thing_type,
                    "ThingGroups": [thing_group],
                },
            },
        },
        "DeviceConfiguration": {
            "FallbackUrl": "https://www.example.com/test-site",
            "LocationUrl": "https://example.aws/fleet",
        },
    }


def cmd_setup(client, args):
    template = args.template
    os.makedirs(args.out_dir, exist_ok=True)
    thing_type = args.thing_type or f"{template}-type"
    thing_group = args.thing_group or f"{template}-group"
    policy = args.policy or f"{template}-device-policy"

    tt = call(client, "CreateThingType", f"thing type {thing_type!r}",
              thingTypeName=thing_type,
              thingTypeProperties={
                  "thingTypeDescription": "devices provisioned by fleet provisioning",
                  "searchableAttributes": ["serial"],
              })
    tg = call(client, "CreateThingGroup", f"thing group {thing_group!r}",
              thingGroupName=thing_group,
              thingGroupProperties={"thingGroupDescription": "fleet-provisioned devices"})
    pol = call(client, "CreatePolicy", f"policy {policy!r}",
               policyName=policy, policyDocument=json.dumps(device_policy_document()))

    if args.template_body:
        with open(args.template_body) as f:
            body_text = f.read()
    else:
        body_text = json.dumps(template_body(args.thing_prefix, thing_type, thing_group, policy))
    target = f"provisioning template {template!r}"
    created = call(client, "CreateProvisioningTemplate", target,
                   templateName=template,
                   description="fleet provisioning by claim",
                   templateBody=body_text,
                   enabled=True,
                   provisioningRoleArn=PROVISIONING_ROLE_ARN)
    expect(created.get("templateName") == template, "CreateProvisioningTemplate", target,
           f"reply names template {created.get('templateName')!r}")

    described = call(client, "DescribeProvisioningTemplate", target, templateName=template)
    expect(described.get("enabled") is True, "DescribeProvisioningTemplate", target,
           f"enabled is {described.get('enabled')!r} right after creating it enabled")
    try:
        same_body = json.loads(described.get("templateBody") or "null") == json.loads(body_text)
    except ValueError:
        same_body = False
    expect(same_body, "DescribeProvisioningTemplate", target,
           "templateBody differs from the one created")
    expect(described.get("provisioningRoleArn") == PROVISIONING_ROLE_ARN,
           "DescribeProvisioningTemplate", target,
           f"provisioningRoleArn is {described.get('provisioningRoleArn')!r}")

    # Disable, then enable again, checking each took effect.
    for enabled in (False, True):
        call(client, "UpdateProvisioningTemplate", f"{target} (enabled={enabled})",
             templateName=template, enabled=enabled)
        now = call(client, "DescribeProvisioningTemplate", target, templateName=template)
        expect(now.get("enabled") is enabled, "UpdateProvisioningTemplate", target,
               f"enabled is {now.get('enabled')!r} after setting it to {enabled}")

    claim = call(client, "CreateProvisioningClaim", f"claim for {target}", templateName=template)
    expect(claim.get("certificatePem") and claim.get("keyPair", {}).get("PrivateKey"),
           "CreateProvisioningClaim", target, "reply lacks certificatePem or keyPair.PrivateKey")
    cert_path = os.path.abspath(os.path.join(args.out_dir, "claim.pem.crt"))
    key_path = os.path.abspath(os.path.join(args.out_dir, "claim.private.pem.key"))
    write_file(cert_path, claim["certificatePem"])
    write_file(key_path, claim["keyPair"]["PrivateKey"], private=True)

    return {
        "template": {
            "templateName": template,
            "templateArn": created.get("templateArn"),
            "defaultVersionId": created.get("defaultVersionId"),
            "enabled": True,
        },
        "thingType": {"thingTypeName": tt.get("thingTypeName"), "thingTypeArn": tt.get("thingTypeArn")},
        "thingGroup": {"thingGroupName": tg.get("thingGroupName"), "thingGroupArn": tg.get("thingGroupArn")},
        "policy": {"policyName": pol.get("policyName"), "policyArn": pol.get("policyArn")},
        "claim": {
            "certificateId": claim.get("certificateId"),
            "cert": cert_path,
            "key": key_path,
            "expiration": claim.get("expiration"),
        },
    }


def cmd_inspect(client, args):
    thing_target = f"thing {args.thing!r}"
    cert_target = f"certificate {args.certificate_id}"

    thing = call(client, "DescribeThing", thing_target, thingName=args.thing)
    expect(thing.get("thingName") == args.thing, "DescribeThing", thing_target,
           f"reply names thing {thing.get('thingName')!r}")

    principals = []
    params = {"thingName": args.thing}
    while True:  # paginate by hand so a fake that loops is caught, not followed
        page = call(client, "ListThingPrincipals", thing_target, **params)
        principals += page.get("principals", [])
        token = page.get("nextToken")
        if not token:
            break
        expect(token != params.get("nextToken"), "ListThingPrincipals", thing_target,
               "nextToken repeats")
        params["nextToken"] = token

    described = call(client, "DescribeCertificate", cert_target,
                     certificateId=args.certificate_id)
    cert = described.get("certificateDescription", {})
    expect(cert.get("certificateId") == args.certificate_id, "DescribeCertificate",
           cert_target, f"reply is for certificate {cert.get('certificateId')!r}")
    expect(cert.get("certificateArn") in principals, "ListThingPrincipals", thing_target,
           f"principals {principals} lack the certificate's ARN {cert.get('certificateArn')!r}")

    statuses = [cert.get("status")]
    for status in ("INACTIVE", "ACTIVE"):
        call(client, "UpdateCertificate", f"{cert_target} (newStatus={status})",
             certificateId=args.certificate_id, newStatus=status)
        now = call(client, "DescribeCertificate", cert_target,
                   certificateId=args.certificate_id)["certificateDescription"]
        expect(now.get("status") == status, "UpdateCertificate", cert_target,
               f"status is {now.get('status')!r} after setting it to {status}")
        statuses.append(now.get("status"))

    return {
        "thing": {k: thing.get(k) for k in
                  ("thingName", "thingId", "thingArn", "thingTypeName", "attributes", "version",
                   "defaultClientId")},
        "principals": principals,
        "certificate": {k: cert.get(k) for k in
                        ("certificateId", "certificateArn", "status", "creationDate",
                         "lastModifiedDate", "validity", "caCertificateId")},
        "statuses": statuses,
    }


def cmd_job(client, args):
    thing_target = f"thing {args.thing!r}"
    job_target = f"job {args.job_id!r}"
    thing = call(client, "DescribeThing", thing_target, thingName=args.thing)
    thing_arn = thing.get("thingArn")
    expect(thing_arn, "DescribeThing", thing_target, "reply lacks thingArn")

    created = call(client, "CreateJob", job_target,
                   jobId=args.job_id,
                   targets=[thing_arn],
                   document=json.dumps({"operation": "reboot", "reason": "interop test"}),
                   description="interop test job",
                   targetSelection="SNAPSHOT")
    expect(created.get("jobId") == args.job_id, "CreateJob", job_target,
           f"reply names job {created.get('jobId')!r}")

    # On AWS a new job's executions appear asynchronously; poll briefly.
    exec_target = f"execution of {job_target} on {thing_target}"
    deadline = time.monotonic() + JOB_EXECUTION_WAIT_S
    attempts = 0
    delay = 0.1
    while True:
        attempts += 1
        try:
            execution = call(client, "DescribeJobExecution", exec_target,
                             jobId=args.job_id, thingName=args.thing)["execution"]
            break
        except StepError as e:
            cause = e.__cause__
            not_found = (isinstance(cause, botocore.exceptions.ClientError)
                         and cause.response.get("Error", {}).get("Code")
                         == "ResourceNotFoundException")
            if not not_found or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    expect(execution.get("jobId") == args.job_id, "DescribeJobExecution", exec_target,
           f"reply is for job {execution.get('jobId')!r}")
    expect(execution.get("thingArn") == thing_arn, "DescribeJobExecution", exec_target,
           f"reply is for thing {execution.get('thingArn')!r}")

    return {
        "job": {k: created.get(k) for k in ("jobId", "jobArn", "description")},
        "execution": {k: execution.get(k) for k in
                      ("jobId", "thingArn", "status", "executionNumber", "versionNumber",
                       "queuedAt", "startedAt", "lastUpdatedAt")},
        "describeAttempts": attempts,
    }


# --------------------------------------------------------------------------


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    # Also accepted after the subcommand; SUPPRESS keeps the subparser from
    # overwriting a value given before it.
    common.add_argument("--http", metavar="URL", default=argparse.SUPPRESS,
                        help="control-plane endpoint, e.g. http://127.0.0.1:PORT")

    p = argparse.ArgumentParser(
        prog="control_plane.py",
        description="AWS IoT control-plane steps with boto3's iot client "
                    "(endpoint_url = --http, region us-east-1, dummy credentials).")
    p.add_argument("--http", metavar="URL",
                   help="control-plane endpoint, e.g. http://127.0.0.1:PORT")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("setup", parents=[common],
                       help="thing type, thing group, policy, template, claim")
    s.add_argument("--template", required=True, help="provisioning template name")
    s.add_argument("--out-dir", required=True, help="where the claim certificate and key go")
    s.add_argument("--thing-prefix", default="device-",
                   help="thing name = PREFIX + SerialNumber parameter (default: device-)")
    s.add_argument("--thing-type", help="default: TEMPLATE-type")
    s.add_argument("--thing-group", help="default: TEMPLATE-group")
    s.add_argument("--policy", help="device policy name; default: TEMPLATE-device-policy")
    s.add_argument("--template-body", metavar="FILE",
                   help="use this template body instead of the built-in one")

    i = sub.add_parser("inspect", parents=[common],
                       help="describe a provisioned thing and its certificate")
    i.add_argument("--thing", required=True)
    i.add_argument("--certificate-id", required=True)

    j = sub.add_parser("job", parents=[common], help="create a job for a thing, describe its execution")
    j.add_argument("--thing", required=True)
    j.add_argument("--job-id", required=True)

    args = p.parse_args(argv)
    if not args.http:
        p.error("--http URL is required")
    return args


def main(argv=None):
    args = parse_args(argv)
    command = {"setup": cmd_setup, "inspect": cmd_inspect, "job": cmd_job}[args.command]
    try:
        result = command(iot_client(args.http), args)
    except StepError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(jsonable(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
