// EditKit's front-end extension: brings workflows saved with earlier versions of the pack's nodes up to date
// before the graph is built (see migrate.js).
import { app } from "../../../scripts/app.js";   // served at /extensions/<pack>/js/editkit.js
import { migrateWorkflow } from "./migrate.js";

app.registerExtension({
  name: "EditKit.WorkflowMigration",
  beforeConfigureGraph(graphData) {
    const changed = migrateWorkflow(graphData);
    if (changed) console.info(`EditKit: updated ${changed} node(s) saved with an earlier layout`);
  },
});
