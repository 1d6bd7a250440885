"""Admission policies (CEL, in the API server; no webhook server) that keep anyone
but the operator from steering it, and keep the operator to its own objects.

Generated into crds/admission-policies.yaml (for `kubectl apply -f crds/`) and
into the chart (with the chart's own operator identity). See docs/security.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))
from agent_access.rules import DEFAULT_GUARDRAILS

GROUP = "agentaccess.io"
V1 = "admissionregistration.k8s.io/v1"
#: The identity of a default install (release agent-access-operator in
#: agent-access-system); the chart renders its own. Cluster admins (system:masters)
#: are always trusted, so a locally run operator with an admin kubeconfig works too.
DEFAULT_OPERATOR = "system:serviceaccount:agent-access-system:agent-access-operator"
DEFAULT_OPERATOR_NAMESPACE = "agent-access-system"
DEFAULT_LEASE = "agent-access-operator"
LEASE_LABEL = f"{GROUP}/leader-election"
REQUESTER = [f"{GROUP}/requester-username", f"{GROUP}/requester-uid", f"{GROUP}/requester-groups"]
TASK_UID = f"{GROUP}/task-uid"
MANAGED = "app.kubernetes.io/managed-by"
#: Controllers that legitimately update objects they do not own (ownerReferences).
CONTROLLERS = [
    "system:kube-controller-manager",
    "system:serviceaccount:kube-system:generic-garbage-collector",
]


#: The subresource of the request ("" for the main resource; absent in CEL when empty).
SUB = {"name": "sub", "expression": "has(request.subResource) ? request.subResource : ''"}


#: The requester's groups as a JSON array of strings (a group name may hold any
#: character; the operator parses this and fails closed on anything else).
GROUPS_JSON = (
    "'[' + request.userInfo.?groups.orValue([]).map(g, '\"' + g.replace('\\\\', '\\\\\\\\')"
    ".replace('\"', '\\\\\"').replace('\\n', '\\\\n').replace('\\r', '\\\\r')"
    ".replace('\\t', '\\\\t') + '\"').join(',') + ']'"
)
UID = "request.userInfo.?uid.orValue('')"


def _role_rule_ok() -> str:
    """The default guardrails as CEL over one Role rule `r` (kept in step with
    rules.Guardrails: the API server re-checks every Role the operator writes)."""
    rails = DEFAULT_GUARDRAILS
    verbs = _list(sorted(rails.forbidden_verbs))
    prefixes = " || ".join(f"v.startsWith({_q(p)})" for p in rails.forbidden_verb_prefixes)
    forbidden = _list(sorted(rails.forbidden_resources))
    protected = _list(sorted(rails.write_protected_resources))
    writes = _list(sorted(rails.write_verbs))
    return (
        f"!r.verbs.exists(v, v == '*' || v in {verbs} || {prefixes}) && "
        "!r.apiGroups.exists(g, g == '*') && "
        "(!has(r.resourceNames) || !r.resourceNames.exists(n, n == '*')) && "
        f"!r.resources.exists(x, x == '*' || {forbidden}.exists(f, x == f || "
        "x.startsWith(f + '/'))) && "
        f"!(r.resources.exists(x, x.split('/')[0] in {protected}) && "
        f"r.verbs.exists(v, v in {writes}))"
    )


def _q(value: str) -> str:
    return json.dumps(value)


def _list(values: list[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def _rules(group: str, resources: list[str], operations: list[str]) -> dict:
    return {
        "apiGroups": [group],
        "apiVersions": ["*"],
        "operations": operations,
        "resources": resources,
    }


def _pair(kind: str, name: str, spec: dict, labels: dict) -> list[dict]:
    binding: dict = {
        "apiVersion": V1,
        "kind": f"{kind}Binding",
        "metadata": {"name": name, "labels": labels},
        "spec": {"policyName": name},
    }
    if kind == "ValidatingAdmissionPolicy":
        binding["spec"]["validationActions"] = ["Deny"]
    return [
        {
            "apiVersion": V1,
            "kind": kind,
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
        },
        binding,
    ]


def policies(
    operators: list[str] | None = None,
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE,
    labels: dict | None = None,
    lease_name: str = DEFAULT_LEASE,
) -> list[dict]:
    role_rule_ok = _role_rule_ok()
    operators = operators or [DEFAULT_OPERATOR]
    labels = labels or {"app.kubernetes.io/name": "agent-access-operator"}
    trusted = (
        f"'system:masters' in request.userInfo.?groups.orValue([]) || "
        f"request.userInfo.username in {_list(operators)}"
    )
    not_trusted = [{"name": "not-the-operator-or-an-admin", "expression": f"!({trusted})"}]
    docs: list[dict] = []

    # 1. Who asked: stamped from the API server's record, whatever the client wrote;
    #    and the revoke finalizer, so the operator need not add it.
    docs += _pair(
        "MutatingAdmissionPolicy",
        f"{GROUP}-requester",
        {
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "matchConstraints": {"resourceRules": [_rules(GROUP, ["agenttasks"], ["CREATE"])]},
            "mutations": [
                {
                    "patchType": "ApplyConfiguration",
                    "applyConfiguration": {
                        "expression": "Object{metadata: Object.metadata{annotations: {"
                        f"{_q(REQUESTER[0])}: request.userInfo.username, "
                        f"{_q(REQUESTER[1])}: "
                        f"{UID}, "
                        f"{_q(REQUESTER[2])}: {GROUPS_JSON}}}, "
                        f"finalizers: [{_q(GROUP + '/revoke')}]}}}}"
                    },
                }
            ],
        },
        labels,
    )

    # 1b. Who decided an approval: stamped from the API server's record, whatever the
    #     client wrote (the whole approver is replaced).
    docs += _pair(
        "MutatingAdmissionPolicy",
        f"{GROUP}-approver",
        {
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "matchConstraints": {
                "resourceRules": [_rules(GROUP, ["agenttaskapprovals"], ["CREATE"])]
            },
            "mutations": [
                {
                    "patchType": "JSONPatch",
                    "jsonPatch": {
                        "expression": "[JSONPatch{op: 'add', path: '/spec/approver', "
                        "value: Object.spec.approver{username: request.userInfo.username, "
                        f"uid: {UID}, groups: request.userInfo.?groups.orValue([])}}}}]"
                    },
                }
            ],
        },
        labels,
    )

    # 1c. Approvals: the stamp is there (the mutating policy is installed), and no
    #     per-task identity decides anything. Immutability is the CRD's own rule.
    per_task = (
        "request.userInfo.username.startsWith('system:serviceaccount:') && "
        "request.userInfo.username.split(':').size() == 4 && "
        "request.userInfo.username.split(':')[3].startsWith('aat-')"
    )
    docs += _pair(
        "ValidatingAdmissionPolicy",
        f"{GROUP}-approval-guard",
        {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [_rules(GROUP, ["agenttaskapprovals"], ["CREATE"])]
            },
            "validations": [
                {
                    "expression": "has(object.spec.approver) && has(object.spec.approver.username)"
                    " && object.spec.approver.username == request.userInfo.username && "
                    f"object.spec.approver.?uid.orValue('') == {UID} && "
                    "object.spec.approver.?groups.orValue([]) == "
                    "request.userInfo.?groups.orValue([])",
                    "message": f"spec.approver was not stamped: is the MutatingAdmissionPolicy "
                    f"{GROUP}-approver installed and bound?",
                    "reason": "Forbidden",
                },
                {
                    "expression": f"!({per_task})",
                    "message": "a per-task identity of the agent-access-operator never "
                    "approves or denies a task",
                    "reason": "Forbidden",
                },
            ],
        },
        labels,
    )

    # 1d. No self-approval: the task's requester and its agent may not decide on it.
    #     The task is the policy's parameter: every AgentTask of the approval's
    #     namespace is checked (those with another UID pass at once). A task the
    #     API server's own cache has not seen yet passes here; the operator checks
    #     the same rules again and does not count such a decision.
    mine = "params.metadata.uid != object.spec.taskUID"
    docs += [
        {
            "apiVersion": V1,
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": f"{GROUP}-no-self-approval", "labels": labels},
            "spec": {
                "failurePolicy": "Fail",
                "paramKind": {"apiVersion": f"{GROUP}/v1alpha1", "kind": "AgentTask"},
                "matchConstraints": {
                    "resourceRules": [_rules(GROUP, ["agenttaskapprovals"], ["CREATE"])]
                },
                "validations": [
                    {
                        "expression": f"{mine} || params.metadata.name == object.spec.taskName",
                        "message": "spec.taskName does not name the AgentTask with spec.taskUID",
                        "reason": "Invalid",
                    },
                    {
                        "expression": f"{mine} || !has(params.metadata.annotations) || "
                        f"params.metadata.annotations[?{_q(REQUESTER[0])}] != "
                        "optional.of(request.userInfo.username)",
                        "message": "self-approval is refused: you created this AgentTask; "
                        "another of the policy's approvers must decide",
                        "reason": "Forbidden",
                    },
                    {
                        "expression": f"{mine} || request.userInfo.username != "
                        "'system:serviceaccount:' + params.metadata.namespace + ':' + "
                        "params.spec.agent",
                        "message": "self-approval is refused: an agent never approves its own "
                        "AgentTask",
                        "reason": "Forbidden",
                    },
                ],
            },
        },
        {
            "apiVersion": V1,
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": f"{GROUP}-no-self-approval", "labels": labels},
            "spec": {
                "policyName": f"{GROUP}-no-self-approval",
                "validationActions": ["Deny"],
                # Every AgentTask of the approval's own namespace; none at all: allowed
                # (the operator ignores approvals for tasks that do not exist).
                "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"},
            },
        },
    ]

    # 2. Only the operator writes a task's status, its annotations and its finalizer.
    ours = f"k.startsWith('{GROUP}/')"
    docs += _pair(
        "ValidatingAdmissionPolicy",
        f"{GROUP}-task-guard",
        {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    _rules(GROUP, ["agenttasks", "agenttasks/status"], ["CREATE", "UPDATE"])
                ]
            },
            "matchConditions": not_trusted,
            "variables": [
                SUB,
                {
                    "name": "newAnnotations",
                    "expression": "has(object.metadata.annotations) ? "
                    f"object.metadata.annotations.filter(k, {ours}) : []",
                },
                {
                    "name": "oldAnnotations",
                    "expression": "oldObject != null && has(oldObject.metadata.annotations) ? "
                    f"oldObject.metadata.annotations.filter(k, {ours}) : []",
                },
                {
                    "name": "newFinalized",
                    "expression": "has(object.metadata.finalizers) && "
                    f"'{GROUP}/revoke' in object.metadata.finalizers",
                },
                {
                    "name": "oldFinalized",
                    "expression": "oldObject != null && has(oldObject.metadata.finalizers) && "
                    f"'{GROUP}/revoke' in oldObject.metadata.finalizers",
                },
            ],
            "validations": [
                {
                    "expression": "variables.sub != 'status'",
                    "message": "the status of an AgentTask is written only by the "
                    "agent-access-operator",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.operation != 'CREATE' || "
                    f"variables.newAnnotations.all(k, k in {_list(REQUESTER)})",
                    "message": f"annotations under {GROUP}/ are set only by the "
                    "agent-access-operator and the API server",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.operation != 'CREATE' || "
                    "(has(object.metadata.annotations) && "
                    f"object.metadata.annotations[?{_q(REQUESTER[0])}] == "
                    "optional.of(request.userInfo.username) && "
                    f"object.metadata.annotations[?{_q(REQUESTER[1])}] == optional.of({UID}) && "
                    f"object.metadata.annotations[?{_q(REQUESTER[2])}] == "
                    f"optional.of({GROUPS_JSON}))",
                    "message": f"the {GROUP}/requester-* annotations were not stamped: is the "
                    f"MutatingAdmissionPolicy {GROUP}-requester installed and bound?",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.operation != 'UPDATE' || ("
                    "variables.newAnnotations.all(k, k in variables.oldAnnotations && "
                    "object.metadata.annotations[k] == oldObject.metadata.annotations[k]) && "
                    "variables.oldAnnotations.all(k, k in variables.newAnnotations))",
                    "message": f"annotations under {GROUP}/ are written only by the "
                    "agent-access-operator",
                    "reason": "Forbidden",
                },
                {
                    # On create the finalizer is there already (the requester policy adds
                    # it: one request less per task, and no moment without it).
                    "expression": "request.operation == 'CREATE' || "
                    "variables.newFinalized == variables.oldFinalized",
                    "message": f"the finalizer {GROUP}/revoke is added and removed only by the "
                    "agent-access-operator",
                    "reason": "Forbidden",
                },
            ],
        },
        labels,
    )

    # 3. A per-task identity never mints a credential that outlives the grant, and
    #    nobody makes a long-lived token for a per-task identity.
    sa_token = "object.type == 'kubernetes.io/service-account-token'"
    docs += _pair(
        "ValidatingAdmissionPolicy",
        f"{GROUP}-no-lasting-tokens",
        {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [_rules("", ["secrets"], ["CREATE", "UPDATE"])]},
            # No exemption, not even for cluster admins or the operator: nobody needs one,
            # and the token controller would fill it with a token that lives as long as
            # the Secret.
            "validations": [
                {
                    "expression": f"!({sa_token}) || "
                    "!request.userInfo.username.startsWith('system:serviceaccount:') || "
                    "!request.userInfo.username.split(':')[3].startsWith('aat-')",
                    "message": "a per-task identity of the agent-access-operator may not create "
                    "service-account-token Secrets: its access must end with its grant",
                    "reason": "Forbidden",
                },
                {
                    "expression": f"!({sa_token}) || !has(object.metadata.annotations) || "
                    "!('kubernetes.io/service-account.name' in object.metadata.annotations) || "
                    "!object.metadata.annotations['kubernetes.io/service-account.name']"
                    ".startsWith('aat-')",
                    "message": "service-account-token Secrets for per-task identities (aat-*) "
                    "are refused: their tokens come only from the operator, bound to the grant",
                    "reason": "Forbidden",
                },
            ],
        },
        labels,
    )

    # 4. The operator's objects are written only by the operator; nobody else makes
    #    objects that look like its own (the aat- prefix and its labels are reserved).
    has_uid = f"has(object.metadata.labels) && '{TASK_UID}' in object.metadata.labels"
    had_uid = f"has(oldObject.metadata.labels) && '{TASK_UID}' in oldObject.metadata.labels"
    docs += _pair(
        "ValidatingAdmissionPolicy",
        f"{GROUP}-owned-objects",
        {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    _rules("", ["serviceaccounts", "secrets"], ["CREATE", "UPDATE"]),
                    _rules(
                        "rbac.authorization.k8s.io", ["roles", "rolebindings"], ["CREATE", "UPDATE"]
                    ),
                ]
            },
            "matchConditions": [
                {
                    "name": "not-the-operator-an-admin-or-a-controller",
                    "expression": f"!({trusted}) && "
                    f"!(request.userInfo.username in {_list(CONTROLLERS)})",
                },
                {
                    "name": "main-resource",
                    "expression": "!has(request.subResource) || request.subResource == ''",
                },
            ],
            "validations": [
                {
                    "expression": f"!({has_uid}) && (oldObject == null || !({had_uid}))",
                    "message": f"objects labelled {TASK_UID} belong to the agent-access-operator: "
                    "only it creates or changes them",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.resource.resource != 'serviceaccounts' || "
                    "request.operation != 'CREATE' || !object.metadata.name.startsWith('aat-')",
                    "message": "ServiceAccount names starting with aat- are reserved for the "
                    "agent-access-operator's per-task identities",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.resource.resource != 'secrets' || "
                    f"object.type != '{GROUP}/token'",
                    "message": f"Secrets of type {GROUP}/token are created only by the "
                    "agent-access-operator",
                    "reason": "Forbidden",
                },
            ],
        },
        labels,
    )

    # 5. The operator's own identity is not a master key: it touches only its own
    #    per-task objects, never anything in its own namespace.
    target = "(request.operation == 'DELETE' ? oldObject : object)"
    docs += _pair(
        "ValidatingAdmissionPolicy",
        f"{GROUP}-operator-limits",
        {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    _rules(
                        "",
                        ["serviceaccounts", "serviceaccounts/token", "secrets"],
                        ["CREATE", "UPDATE", "DELETE"],
                    ),
                    _rules(
                        "rbac.authorization.k8s.io",
                        ["roles", "rolebindings"],
                        ["CREATE", "UPDATE", "DELETE"],
                    ),
                ]
            },
            "matchConditions": [
                {
                    "name": "the-operator",
                    "expression": f"request.userInfo.username in {_list(operators)}",
                }
            ],
            "variables": [
                SUB,
                {"name": "target", "expression": target},
                {
                    "name": "ours",
                    "expression": "has(variables.target.metadata.labels) && "
                    f"'{TASK_UID}' in variables.target.metadata.labels && "
                    f"'{MANAGED}' in variables.target.metadata.labels && "
                    f"variables.target.metadata.labels['{MANAGED}'] == 'agent-access-operator'",
                },
                {
                    "name": "wasOurs",
                    "expression": "oldObject == null || (has(oldObject.metadata.labels) && "
                    f"'{TASK_UID}' in oldObject.metadata.labels)",
                },
            ],
            "validations": [
                {
                    "expression": f"request.namespace != {_q(operator_namespace)}",
                    "message": "the agent-access-operator never creates, changes or deletes "
                    "ServiceAccounts, tokens, Secrets or RBAC in its own namespace",
                    "reason": "Forbidden",
                },
                {
                    "expression": "variables.sub != 'token' || request.name.startsWith('aat-')",
                    "message": "the agent-access-operator mints tokens only for its per-task "
                    "ServiceAccounts (aat-*)",
                    "reason": "Forbidden",
                },
                {
                    "expression": "variables.sub == 'token' || "
                    "(variables.ours && variables.wasOurs)",
                    "message": "the agent-access-operator may only create, change or delete "
                    f"objects it made for a task (labelled {TASK_UID})",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.resource.resource != 'serviceaccounts' || "
                    "variables.sub != '' || "
                    "variables.target.metadata.name.startsWith('aat-')",
                    "message": "the agent-access-operator's ServiceAccounts are named aat-*",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.resource.resource != 'secrets' || "
                    f"variables.target.type == '{GROUP}/token' && "
                    "(oldObject == null || oldObject.type == '" + GROUP + "/token')",
                    "message": "the agent-access-operator writes only Secrets of type "
                    f"{GROUP}/token",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.resource.resource != 'rolebindings' || "
                    "request.operation == 'DELETE' || (object.roleRef.kind == 'Role' && "
                    "object.roleRef.name == object.metadata.name && "
                    "has(object.subjects) && size(object.subjects) == 1 && "
                    "object.subjects[0].kind == 'ServiceAccount' && "
                    "(object.subjects[0].name.startsWith('aat-') || "
                    "(object.metadata.name.endsWith('-token-reader') && "
                    "object.subjects[0].namespace == request.namespace)))",
                    "message": "the agent-access-operator binds only its own Role of the same "
                    "name to one ServiceAccount",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.resource.resource != 'roles' || "
                    "request.operation == 'DELETE' || !has(object.rules) || "
                    f"object.rules.all(r, {role_rule_ok})",
                    "message": "a Role made by the agent-access-operator holds nothing the "
                    "guardrails forbid ('*', escalate, bind, impersonation, token minting, "
                    "ephemeral containers, writes on RBAC, ServiceAccounts, namespaces or the "
                    "operator's own API)",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.resource.resource != 'roles' || "
                    "request.operation == 'DELETE' || "
                    "!object.metadata.name.endsWith('-token-reader') || "
                    "(size(object.rules) == 1 && object.rules[0].verbs == ['get'] && "
                    "object.rules[0].resources == ['secrets'] && "
                    "has(object.rules[0].resourceNames) && "
                    "size(object.rules[0].resourceNames) == 1)",
                    "message": "a token-reader Role of the agent-access-operator lets its agent "
                    "get exactly one Secret",
                    "reason": "Forbidden",
                },
                {
                    "expression": "request.operation == 'DELETE' || "
                    "!has(namespaceObject.metadata.labels) || "
                    f"namespaceObject.metadata.labels[?'{GROUP}/protected'] != optional.of('true')",
                    "message": f"the agent-access-operator never creates or changes anything "
                    f"in a namespace labelled {GROUP}/protected=true (it may still delete "
                    "what it made there before: revocation)",
                    "reason": "Forbidden",
                },
            ],
        },
        labels,
    )
    # 6. The leader-election Lease is written only by the operator: nobody else can
    #    hold every replica off by rewriting it again and again. Protected by name
    #    (the install's own) and, wherever it lives, by the label the operator puts on it.
    marked = (
        f"has({{o}}.metadata.labels) && "
        f"{{o}}.metadata.labels[?'{LEASE_LABEL}'] == optional.of('true')"
    )
    docs += _pair(
        "ValidatingAdmissionPolicy",
        f"{GROUP}-leader-lease",
        {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    _rules("coordination.k8s.io", ["leases"], ["CREATE", "UPDATE", "DELETE"])
                ]
            },
            "matchConditions": not_trusted,
            "variables": [
                {"name": "lease", "expression": _q(lease_name)},
                {
                    "name": "name",
                    "expression": "request.operation == 'DELETE' ? oldObject.metadata.name : "
                    "object.metadata.name",
                },
            ],
            "validations": [
                {
                    "expression": f"request.namespace != {_q(operator_namespace)} || "
                    "variables.name != variables.lease",
                    "message": "the agent-access-operator's leader-election Lease is written "
                    "only by the operator",
                    "reason": "Forbidden",
                },
                {
                    "expression": f"(object == null || !({marked.format(o='object')})) && "
                    f"(oldObject == null || !({marked.format(o='oldObject')}))",
                    "message": f"Leases labelled {LEASE_LABEL}=true belong to the "
                    "agent-access-operator's leader election: only it writes them",
                    "reason": "Forbidden",
                },
            ],
        },
        labels,
    )
    return docs
