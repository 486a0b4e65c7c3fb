// Validates Knative objects offline against the schemas generated from Knative's CRDs by
// @kubernetes-models/knative (serving v1.10). Usage:
//   node validate.cjs NODE_PREFIX < objects.json
// where NODE_PREFIX holds node_modules/@kubernetes-models/knative and objects.json is
// [{"id": ..., "object": {...}}, ...]. Prints [{"id", "ok", "error"}] as JSON.
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const prefix = process.argv[2];
if (!prefix) {
  console.error("usage: node validate.cjs NODE_PREFIX < objects.json");
  process.exit(2);
}
const load = createRequire(path.join(path.resolve(prefix), "package.json"));

function modelFor(object) {
  const [group, version] = String(object.apiVersion || "").split("/");
  if (!group || !version || !group.endsWith("knative.dev")) return null;
  let models;
  try {
    models = load(`@kubernetes-models/knative/${group}/${version}`);
  } catch (e) {
    return null;
  }
  return models[object.kind] || null;
}

const results = JSON.parse(fs.readFileSync(0, "utf8")).map(({ id, object }) => {
  const Model = modelFor(object);
  if (!Model) return { id, ok: false, error: `no Knative schema for ${object.apiVersion} ${object.kind}` };
  try {
    new Model(object).validate();
    return { id, ok: true, error: null };
  } catch (e) {
    return { id, ok: false, error: String(e && e.message ? e.message : e) };
  }
});
process.stdout.write(JSON.stringify(results));
