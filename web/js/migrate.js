// Migrations of workflows saved with earlier versions of the pack's nodes (pure functions, no imports, so
// that the tests can run them with Node.js). The front end restores widget values by position, and newer
// front ends (1.4x) also by name from `widgets_values_named`, so a node whose widgets changed must have both
// rewritten before the graph is configured.

// The Attention Controller's widgets before they were grouped under the `edit` DynamicCombo.
const OLD_CONTROLLER_WIDGETS = [
  "source_prompt", "target_prompt", "negative_prompt", "edit", "cross_replace", "self_replace", "word_release",
  "reweight", "blend_words", "blend_threshold", "blend_start", "masactrl_start_step", "masactrl_start_layer",
  "masactrl_mask_word", "max_resolution", "cfg",
];

// The settings of each edit, in the node's order (nodes/attention_control.py): [name, type].
const PROMPT_TO_PROMPT_SETTINGS = [
  ["cross_replace", "FLOAT"], ["cross_replace_start", "FLOAT"], ["self_replace", "FLOAT"],
  ["self_replace_start", "FLOAT"], ["word_windows", "STRING"], ["reweight", "STRING"], ["blend_words", "STRING"],
  ["blend_subtract_words", "STRING"], ["blend_threshold", "FLOAT"], ["blend_subtract_threshold", "FLOAT"],
  ["blend_start", "FLOAT"], ["cross_max_resolution", "INT"], ["self_max_resolution", "INT"],
];
const MASACTRL_SETTINGS = [
  ["start_step", "INT"], ["end_step", "INT"], ["layers", "STRING"], ["keys_values", "COMBO"], ["mask_word", "STRING"],
  ["mask_threshold", "FLOAT"], ["source_mask", "MASK"], ["target_mask", "MASK"],
];
const WIDGET_TYPES = new Set(["INT", "FLOAT", "STRING", "COMBO"]);

function isOldNamed(named) {
  return named !== null && typeof named === "object" && "masactrl_start_layer" in named;
}

export function isOldAttentionController(node) {
  if (node.type !== "EditKitAttentionController") return false;
  const values = node.widgets_values;
  return isOldNamed(node.widgets_values_named) || (Array.isArray(values)
    && values.length === OLD_CONTROLLER_WIDGETS.length && typeof values[6] === "string");
}

// The old widgets' values by name; a named save wins over the positional list, as it does when restoring.
function oldValues(node) {
  const values = Array.isArray(node.widgets_values) ? node.widgets_values : [];
  const named = isOldNamed(node.widgets_values_named) ? node.widgets_values_named : {};
  return Object.fromEntries(OLD_CONTROLLER_WIDGETS.map((name, i) => [name, name in named ? named[name] : values[i]]));
}

function newSettings(old) {
  if (old.edit === "masactrl") {
    return {
      start_step: old.masactrl_start_step, end_step: 10000, layers: `${old.masactrl_start_layer}-15`,
      keys_values: "source", mask_word: old.masactrl_mask_word, mask_threshold: 0.1,
    };
  }
  return {
    cross_replace: old.cross_replace, cross_replace_start: 0.0, self_replace: old.self_replace,
    self_replace_start: 0.0, word_windows: old.word_release, reweight: old.reweight, blend_words: old.blend_words,
    blend_subtract_words: "", blend_threshold: old.blend_threshold, blend_subtract_threshold: 0.3,
    blend_start: old.blend_start,
    // 32 was the old default, which left SD1.5's 64x64 layers unedited; the paper edits every layer
    cross_max_resolution: old.max_resolution === 32 ? 0 : old.max_resolution, self_max_resolution: 16,
  };
}

function linkTargetSlot(link) {
  return Array.isArray(link) ? [link[3], link[4]] : [link.target_id, link.target_slot];
}

function setLinkTargetSlot(link, slot) {
  if (Array.isArray(link)) link[4] = slot; else link.target_slot = slot;
}

// Rewrites one node of the old layout in place (its values, its input slots and the links into them).
export function migrateAttentionController(node, links) {
  if (!isOldAttentionController(node)) return false;
  const old = oldValues(node);
  const settings = newSettings(old);
  const layout = old.edit === "masactrl" ? MASACTRL_SETTINGS : PROMPT_TO_PROMPT_SETTINGS;
  const oldInputs = node.inputs ?? [];
  const byName = Object.fromEntries(oldInputs.map((input) => [input.name, input]));
  const linkOf = (name) => byName[name]?.link ?? null;
  const widget = (name, type) => ({ name, type, link: linkOf(name), widget: { name } });

  const values = [old.source_prompt, old.target_prompt, old.negative_prompt, old.edit];
  const inputs = [
    { name: "model", type: "MODEL", link: linkOf("model") },
    { name: "clip", type: "CLIP", link: linkOf("clip") },
    widget("source_prompt", "STRING"), widget("target_prompt", "STRING"), widget("negative_prompt", "STRING"),
    widget("edit", "COMBO"),
  ];
  for (const [name, type] of layout) {
    if (WIDGET_TYPES.has(type)) {
      values.push(settings[name]);
      inputs.push({ name: `edit.${name}`, type, link: null, widget: { name: `edit.${name}` } });
    } else {
      inputs.push({ name: `edit.${name}`, type, link: null, shape: 7 });
    }
  }
  values.push(old.cfg);
  inputs.push(widget("cfg", "FLOAT"));
  inputs.push({ name: "inversion", type: "EDITKIT_INVERSION", link: linkOf("inversion"), shape: 7 });

  const slotOf = Object.fromEntries(inputs.map((input, i) => [input.name, i]));
  for (const link of links ?? []) {
    const [target, slot] = linkTargetSlot(link);
    if (target === node.id && oldInputs[slot] && oldInputs[slot].name in slotOf) {
      setLinkTargetSlot(link, slotOf[oldInputs[slot].name]);
    }
  }
  node.inputs = inputs;
  node.widgets_values = values;
  if ("widgets_values_named" in node) {
    const names = inputs.filter((input) => input.widget).map((input) => input.widget.name);
    node.widgets_values_named = Object.fromEntries(names.map((name, i) => [name, values[i]]));
  }
  return true;
}

// Migrates every node of a saved workflow (UI format) in place; returns the number of nodes changed.
export function migrateWorkflow(workflow) {
  let changed = 0;
  for (const node of workflow.nodes ?? []) {
    if (migrateAttentionController(node, workflow.links)) changed += 1;
  }
  return changed;
}
