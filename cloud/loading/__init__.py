"""`cicada.cloud.loading`: where a cold start's weights come from (stage sources) and the load
strategies Cicada is measured against."""
