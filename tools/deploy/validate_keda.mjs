// Validates KEDA objects (read as JSON from stdin: [{where, doc}]) against the schemas of the
// @kubernetes-models/keda npm package. Called by tools/deploy/validate_k8s.py.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(process.env.DDIT_KEDA_MODELS + "/");
const kinds = {
  ScaledObject: "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
  ScaledJob: "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob",
  TriggerAuthentication: "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication",
  ClusterTriggerAuthentication: "@kubernetes-models/keda/keda.sh/v1alpha1/ClusterTriggerAuthentication",
};
const items = JSON.parse(readFileSync(0, "utf8"));
let bad = 0;
for (const { where, doc } of items) {
  const mod = require(kinds[doc.kind]);
  const Model = mod[doc.kind];
  try {
    new Model(doc).validate();
  } catch (e) {
    bad += 1;
    console.log(`INVALID ${where}: ${e.message}`);
  }
}
if (bad > 0) process.exit(1);
