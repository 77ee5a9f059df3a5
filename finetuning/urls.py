from django.urls import path

from finetuning import api

urlpatterns = [
    path("jobs", api.JobListView.as_view(), name="jobs"),
    path("jobs/<int:pk>", api.JobDetailView.as_view(), name="job"),
    path("jobs/<int:pk>/cancel", api.JobCancelView.as_view(), name="job-cancel"),
]
