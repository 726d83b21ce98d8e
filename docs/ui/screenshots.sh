#!/usr/bin/env bash
# The UI screenshots in docs/ui/, from a store the demo matrix ran into (Debian's chromium):
#   SPARSELAB_HOME=/tmp/demo/home MLFLOW_TRACKING_URI=sqlite:////tmp/demo/mlflow.db \
#     sparselab run matrix/demo.yaml
#   docs/ui/screenshots.sh /tmp/demo/mlflow.db docs/ui
set -e
DB=$1; OUT=$2; mkdir -p $OUT
python -m mlflow ui --backend-store-uri sqlite:///$DB --host 127.0.0.1 --port 5077 > /tmp/shots_ui.log 2>&1 &
UI=$!
for i in $(seq 60); do curl -sf http://127.0.0.1:5077/health >/dev/null && break; sleep 1; done
EXP=$(python - <<PY
from mlflow.tracking import MlflowClient
c=MlflowClient("sqlite:///$DB"); e=c.get_experiment_by_name("demo"); print(e.experiment_id)
PY
)
RUN=$(python - <<PY
from mlflow.tracking import MlflowClient
c=MlflowClient("sqlite:///$DB")
r=c.search_runs(["$EXP"], filter_string="tags.\`sparselab.cell\` = 'wanda_lora'", max_results=1)[0]
print(r.info.run_id)
PY
)
shot() { chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=$3 --virtual-time-budget=15000 --screenshot=$OUT/$1 "$2" 2>/dev/null; }
Q="searchFilter=tags.%60sparselab.latest%60%20%3D%20%27true%27&orderByKey=metrics.%60wikitext2.ppl%60&orderByAsc=true&workflowType=machine_learning"
shot ui_runs_table.png "http://127.0.0.1:5077/#/experiments/$EXP/runs?$Q" 2560,800
shot ui_run_page.png "http://127.0.0.1:5077/#/experiments/$EXP/runs/$RUN?workflowType=machine_learning" 1600,1100
shot ui_chart_view.png "http://127.0.0.1:5077/#/experiments/$EXP/runs?$Q&compareRunsMode=CHART" 1600,1100
kill $UI
echo "exp $EXP run $RUN"
